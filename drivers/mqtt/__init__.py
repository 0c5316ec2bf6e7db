"""drivers/mqtt package of store-gateway."""
