"""HTTP intake: cloud POS webhooks (generic JSON, Lightspeed Retail X-Series, Square) on the local API."""
