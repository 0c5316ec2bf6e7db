"""Read a YAML document keeping the position of every key and item, and say where it cannot be read.

The YAML is read with ruamel.yaml's round-trip loader, which keeps the position of every key and item, so a
place in the document (a key path such as ``('hq', 'port')``) maps back to the line someone has to fix. It is
composed first, so syntax errors, every duplicate key, unsupported tags and reused anchors are all reported
with their lines before anything is built; only then is it constructed.

Each problem goes to a :data:`Report` callback; :class:`AbortLoadError` means nothing more can be read.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, Protocol

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, ReusedAnchorWarning, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gateway.kernel.model_types import KeyPath

_LOGGER = logging.getLogger(__name__)

VALUE_REPR_MAX: Final = 60
_MERGE_TAG: Final = "tag:yaml.org,2002:merge"
_STANDARD_TAGS: Final = frozenset(
    f"tag:yaml.org,2002:{name}"
    for name in ("str", "int", "float", "bool", "null", "map", "seq", "merge", "timestamp")
)

Position = tuple[int, int]
"""1-based line and column."""


class Report(Protocol):
    """Where problems go: at a position (None: not at a place in the file), a key path, the value shown."""

    def __call__(
        self, position: Position | None, path: KeyPath, value_repr: str | None, message: str, hint: str | None
    ) -> None: ...


class AbortLoadError(Exception):
    """Stop loading: the issues gathered so far are all that can be said."""


@dataclasses.dataclass(frozen=True, slots=True)
class DocumentKind:
    """What a kind of document is called in messages, and where a good one is to start from."""

    noun: str
    """``config``, ``profile``, ``scenario``: "cannot read the config file", "the profile file is empty"."""
    example: str
    """Where to find one that works, for the hint on an empty file or a file that is not a mapping."""
    max_bytes: int
    """Anything larger is a mistake (or /dev/zero)."""


def read_file(path: Path, kind: DocumentKind, report: Report) -> bytes:
    """The file's bytes (at most one more than ``kind.max_bytes``: :func:`decode` refuses more), or a reported
    problem and AbortLoadError."""
    try:
        with path.open("rb") as fh:
            return fh.read(kind.max_bytes + 1)
    except OSError as exc:
        report(
            None, (), None, f"cannot read the {kind.noun} file: {exc.strerror or exc}", _read_hint(path, exc)
        )
        raise AbortLoadError from exc


def decode(raw: bytes, kind: DocumentKind, report: Report) -> str:
    """The text of the document, or a reported problem (too large, not UTF-8) and AbortLoadError."""
    if len(raw) > kind.max_bytes:
        report(None, (), None, f"the {kind.noun} file is larger than {kind.max_bytes} bytes", None)
        raise AbortLoadError
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        report((line, column), (), None, "the file is not valid UTF-8", "save it as UTF-8")
        raise AbortLoadError from exc


def parse(text: str, kind: DocumentKind, report: Report) -> CommentedMap:
    """Compose first (syntax, duplicate keys, tags: all reported with lines), then construct."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            node = YAML(typ="rt").compose(text)
    except MarkedYAMLError as exc:
        _report_mark(exc, "YAML syntax error", kind, report)
        raise AbortLoadError from exc
    except YAMLError as exc:
        report(None, (), None, f"YAML error: {first_line(str(exc))}", None)
        raise AbortLoadError from exc
    except RecursionError as exc:
        report(None, (), None, "YAML is nested too deeply", None)
        raise AbortLoadError from exc
    for warning in caught:
        _report_warning(warning.message, report)
    if node is None:
        report((1, 1), (), None, f"the {kind.noun} file is empty", f"start from {kind.example}")
        raise AbortLoadError
    if _check_nodes(node, report):
        raise AbortLoadError
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # already reported from compose()
            root = yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        position = (mark.line + 1, mark.column + 1) if mark is not None else None
        # Not exc.problem: for a duplicate key it quotes both values, which may be secrets.
        report(position, (), None, "YAML error: this value cannot be read", None)
        raise AbortLoadError from exc
    except RecursionError as exc:
        report(None, (), None, "YAML is nested too deeply", None)
        raise AbortLoadError from exc
    except Exception as exc:  # ruamel's constructor can fail on odd but well-formed documents
        _LOGGER.debug("YAML construction failed", exc_info=True)
        report(None, (), None, f"YAML cannot be read: {type(exc).__name__}", None)
        raise AbortLoadError from exc
    if not isinstance(root, CommentedMap):
        report(
            (1, 1),
            (),
            short_repr(root),
            f"the {kind.noun} must be a mapping of keys to values",
            f"see {kind.example}",
        )
        raise AbortLoadError
    return root


def position_of(root: Any, path: KeyPath) -> Position | None:
    """Where ``path`` is in the document: its key, or the deepest part of it that is there."""
    node = root
    if node is None:
        return None
    position = _lc(node)
    for elem in path:
        try:
            if isinstance(node, CommentedMap) and elem in node:
                try:
                    position = node.lc.key(elem)
                except KeyError:  # a key merged in with '<<: *anchor'
                    position = _lc(node)
                node = node[elem]
            elif isinstance(node, CommentedSeq) and isinstance(elem, int) and 0 <= elem < len(node):
                position = node.lc.item(elem)
                node = node[elem]
            else:
                break
        except (KeyError, IndexError, TypeError):
            break
    return position[0] + 1, position[1] + 1


def key_position(node: Any, key: Any) -> Position | None:
    try:
        line, column = node.lc.key(key)
    except (AttributeError, KeyError, TypeError):
        return None
    return int(line) + 1, int(column) + 1


def os_error_hint(exc: Exception) -> str | None:
    """What to do about a file that is there but cannot be read."""
    if isinstance(exc, PermissionError):
        return "the gateway's user must be able to read it"
    if isinstance(exc, IsADirectoryError):
        return "give the path of a file, not a folder"
    return None


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= VALUE_REPR_MAX else text[: VALUE_REPR_MAX - 3] + "..."


# --- problems the YAML itself has


def _read_hint(path: Path, exc: OSError) -> str | None:
    """The file is named on the command line (or found in a folder): a relative path is the current directory's."""
    if isinstance(exc, FileNotFoundError):
        if path.is_absolute():
            return "check the path"
        return f"check the path; it is relative to the current directory {Path.cwd()}"
    return os_error_hint(exc)


def _check_nodes(root: Node, report: Report) -> bool:
    """Report every duplicate key and unsupported tag; True if there was any."""
    found = False
    for node, path, first in _suspect_nodes(root):
        found = True
        mark = node.start_mark
        if first is not None:
            message = f"duplicate key {node.value!r} (first at line {first})"
            hint = "keep one of them: YAML would silently use only one"
        else:
            message = f"YAML tag {str(node.tag).replace('tag:yaml.org,2002:', '!!')} is not supported"
            hint = "remove the tag; '!!str' is the only one needed, to force text"
        report((mark.line + 1, mark.column + 1), path, None, message, hint)
    return found


def _report_mark(exc: MarkedYAMLError, what: str, kind: DocumentKind, report: Report) -> None:
    mark = exc.problem_mark or exc.context_mark
    position = (mark.line + 1, mark.column + 1) if mark is not None else None
    problem = first_line(exc.problem or "") or first_line(str(exc))
    context = first_line(exc.context or "")
    if context.startswith("expected a single document"):
        problem, context = "a second YAML document starts here", ""
    if context and exc.context_mark is not None and mark is not exc.context_mark:
        context += f" that starts at line {exc.context_mark.line + 1}"
    message = f"{what}: {problem}" + (f" ({context})" if context else "")
    report(position, (), None, message, _syntax_hint(problem, kind))


def _report_warning(message: Warning | str, report: Report) -> None:
    text = str(message)
    if isinstance(message, ReusedAnchorWarning):
        name = re.search(r"anchor '([^']*)'", text)
        second = re.search(r"second occurrence.*?line (\d+), column (\d+)", text, re.DOTALL)
        position = (int(second.group(1)), int(second.group(2))) if second else None
        report(
            position,
            (),
            None,
            f"anchor &{name.group(1) if name else '?'} is defined twice",
            "give each anchor a unique name",
        )
    else:
        report(None, (), None, f"YAML warning: {first_line(text)}", None)


def _syntax_hint(problem: str, kind: DocumentKind) -> str | None:
    if "\\t" in problem or "tab" in problem:
        return "YAML indentation must use spaces, not tabs"
    if "mapping values are not allowed" in problem:
        return "check the indentation, and quote values that contain ': '"
    if "found character" in problem and "that cannot start any token" in problem:
        return "quote values that start with '@', '`' or '%'"
    if "expected <block end>" in problem or "could not find expected ':'" in problem:
        return "check the indentation of this line against the lines above"
    if "found undefined alias" in problem:
        return "define the anchor (&name) before using the alias (*name)"
    if "second YAML document" in problem:
        return f"one {kind.noun} per file: remove the extra '---'"
    return None


def _suspect_nodes(root: Node) -> Iterator[tuple[Node, KeyPath, int | None]]:
    """Duplicate keys (with the line of the first) and nodes with an unsupported tag (with None)."""
    seen: set[int] = set()
    stack: list[tuple[Node, KeyPath]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if str(node.tag) not in _STANDARD_TAGS:
            yield node, path, None
        if isinstance(node, MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                if isinstance(key, ScalarNode) and str(key.tag) != _MERGE_TAG:
                    ident = (str(key.tag), str(key.value))
                    if ident in first:
                        yield key, (*path, str(key.value)), first[ident]
                    else:
                        first[ident] = key.start_mark.line + 1
                    stack.append((value, (*path, str(key.value))))
                else:
                    stack.append((key, path))
                    stack.append((value, path))
        elif isinstance(node, SequenceNode):
            stack.extend((item, (*path, i)) for i, item in enumerate(node.value))


def _lc(node: Any) -> tuple[int, int]:
    try:
        return int(node.lc.line), int(node.lc.col)
    except (AttributeError, TypeError):
        return 0, 0
