"""firmware_configs package of store-gateway: device profiles (``profiles/*.yaml``) and example store configs.

Shipped as package data so an installed gateway (pip, Docker) finds its profiles; see drivers/profiles.py.
"""
