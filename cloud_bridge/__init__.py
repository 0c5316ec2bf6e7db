"""cloud_bridge package of store-gateway."""
