"""BLE sensors heard by one shared passive scanner: BTHome v2, Ruuvi RAWv2, Xiaomi LYWSD03MMC custom firmware.

The decoders (:mod:`drivers.ble.bthome`, :mod:`drivers.ble.ruuvi`, :mod:`drivers.ble.xiaomi`, dispatched by
:mod:`drivers.ble.decode`) are pure: advertisement bytes in, a ``SensorSample`` or a ``DecodeError`` out. The
I/O (:mod:`drivers.ble.driver`) owns the bleak scanner.
"""
