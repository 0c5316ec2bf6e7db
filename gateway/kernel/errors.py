"""The one root of the gateway's own errors.

Every error the gateway raises on purpose (a config that cannot be used, a journal that cannot be opened, a
driver's device trouble, a command HQ may not give...) is a :class:`StoreGatewayError`, with a message a
technician can act on. The CLI catches this one class and prints the message; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class StoreGatewayError(Exception):
    """Base of the gateway's own errors: the message says what is wrong and, where it can, what to do."""
