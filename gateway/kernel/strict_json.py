"""Duplicate JSON keys: ``{"qty": 1, "qty": 100}`` is refused, not read as its last value.

JSON parsers (orjson, pydantic's, the standard library's) keep the last of two equal keys, so a message can
say one thing to the gateway and another to anything that reads it differently. Checking costs little: every
key ends with a quote then a colon (``"\\s*:``), so when the raw bytes hold no more such endings than the parsed
document has keys, no key can have been dropped. Only otherwise (a string value containing ``":``, or a real
duplicate) is the message parsed again, keeping every pair.

The one check, for every input that refuses duplicate keys: HQ commands and webhooks (:func:`duplicate_key`,
a full parse: their signatures cover bytes whose meaning must be unique) and the kiosk
(:func:`has_duplicate_keys`, where the decoder parses with orjson anyway: +6 % of its decode). Tills are not
checked: their decoder validates straight from the bytes, and the parse this needs would double its cost
(bench/duplicate_keys.py, figures in docs/PERFORMANCE.md), while what is stored and forwarded is the gateway's own
re-serialisation of the validated sale, so no reader downstream can see the duplicate.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

_KEY_END: Final = re.compile(rb'"\s*:')
_SPACED: Final = (b'" ', b'"\n', b'"\r', b'"\t')
"""Only when a quote is followed by JSON whitespace can a key's end be other than the two bytes ``":``."""


def has_duplicate_keys(payload: bytes, doc: Any) -> bool:
    """Whether ``payload``, already parsed into ``doc``, repeats a key inside one object."""
    if count_key_ends(payload) <= count_keys(doc):
        return False
    try:
        return duplicate_key(payload) is not None
    except RecursionError:
        return False  # the caller's parser accepted it; the standard library's verdict on its depth is moot


def count_key_ends(payload: bytes) -> int:
    """Quote-colon pairs: every key's end, and any such bytes inside string values (never fewer than keys)."""
    if any(spaced in payload for spaced in _SPACED):
        return len(_KEY_END.findall(payload))
    return payload.count(b'":')  # no whitespace after any quote: a key ends with exactly these two bytes


def count_keys(doc: Any) -> int:
    """Keys of every object in a parsed document (equal keys in one object count once)."""
    count = 0
    stack = [doc]
    pop, push = stack.pop, stack.append
    while stack:
        item = pop()
        kind = type(item)
        if kind is dict:
            count += len(item)
            values = item.values()
        elif kind is list:
            values = item
        else:
            continue
        for value in values:
            kind = type(value)
            if kind is dict or kind is list:
                push(value)
    return count


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_pairs(pairs: list[tuple[str, Any]]) -> None:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKeyError(key)
        seen.add(key)


def _ignore(_: str) -> None:
    return None


def duplicate_key(raw: bytes | str) -> str | None:
    """The first key that appears twice in one object of ``raw``, compared as decoded (``"\\u006bind"`` is
    ``"kind"``), or None: also when ``raw`` is not JSON (the parser that reads it next says why). Raises
    ``RecursionError`` for a document nested deeper than the standard library parses."""
    try:
        # Values are not needed: no int-size limit, no float parsing, no objects kept.
        json.loads(
            raw,
            object_pairs_hook=_unique_pairs,
            parse_int=_ignore,
            parse_float=_ignore,
            parse_constant=_ignore,
        )
    except _DuplicateKeyError as err:
        return err.key
    except ValueError:
        return None
    return None
