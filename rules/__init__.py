"""rules package of store-gateway."""
