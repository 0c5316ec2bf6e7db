"""simulators package of store-gateway."""
