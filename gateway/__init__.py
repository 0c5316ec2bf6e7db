"""store-gateway: the core (config, event model, journal, runtime, local API, CLI)."""

__version__ = "0.1.0"
