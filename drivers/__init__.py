"""drivers package of store-gateway."""
