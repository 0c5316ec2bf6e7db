"""Modbus TCP and RTU polling driver: register maps from profiles, polling groups, writes."""
