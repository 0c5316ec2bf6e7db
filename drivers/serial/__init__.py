"""Serial devices (RS-232/RS-485/USB adapters) read with pyserial-asyncio-fast: framers, codecs, the driver."""
