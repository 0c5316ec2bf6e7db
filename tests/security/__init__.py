"""Security tests, one module per threat (docs/SECURITY.md): each against real peers."""
