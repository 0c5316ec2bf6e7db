"""What a pydantic model expects at a place in a document, and what to tell someone who wrote something else.

The document loader (:mod:`gateway.kernel.loader`) walks a YAML document and the model side by side: at each
key it asks :class:`TypeInfo` what is expected there (a model, a tagged union of models, a list, a path, a
scalar), so it can find secret fields, make relative paths absolute and read a union member's deprecated keys.
When pydantic refuses the result, :class:`LocInfo` reads the error's location against the same models, and
:func:`validation_hint` turns the error and the field there into a hint ("did you mean 'topic_prefix'?",
"allowed values: '3.1.1', '5'", "add 'type: mqtt'...").
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import types
from collections.abc import Iterator, Mapping
from pathlib import PurePath
from typing import Annotated, Any, Final, Literal, Union, get_args, get_origin

from pydantic import BaseModel, Field, SecretBytes, SecretStr
from pydantic.fields import FieldInfo

KeyPath = tuple[str | int, ...]
"""A place in a document: mapping keys and list indexes from the top."""

MAX_DEPTH: Final = 64
"""How deep a document (and the models read against it) may nest."""

_SECRET_NAME_PARTS: Final = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "api_key",
    "apikey",
    "credential",
)


@dataclasses.dataclass(frozen=True, slots=True)
class TypeInfo:
    """An expected type without Annotated and Optional, and its discriminator if it is a tagged union."""

    base: Any
    discriminator: str | None = None

    @classmethod
    def of(cls, tp: Any) -> TypeInfo:
        discriminator: str | None = None
        while True:
            if get_origin(tp) is Annotated:
                args = get_args(tp)
                for meta in args[1:]:
                    if isinstance(meta, FieldInfo) and isinstance(meta.discriminator, str):
                        discriminator = meta.discriminator
                tp = args[0]
                continue
            if _is_union(tp):
                members = [a for a in get_args(tp) if a is not type(None)]
                if len(members) == 1:
                    tp = members[0]
                    continue
            return cls(tp, discriminator)

    @property
    def models(self) -> list[type[BaseModel]]:
        members = get_args(self.base) if _is_union(self.base) else (self.base,)
        found = [TypeInfo.of(m).base for m in members]
        return [m for m in found if isinstance(m, type) and issubclass(m, BaseModel)]

    @property
    def scalar(self) -> bool:
        """True where a reference to a value may stand: a known type that is not a model or a container."""
        if self.base is None or self.models:
            return False
        return get_origin(self.base) not in (list, dict, tuple, set, frozenset)

    @property
    def path(self) -> bool:
        return isinstance(self.base, type) and issubclass(self.base, PurePath)

    def takes_int_keys(self) -> bool:
        """A ``dict`` whose keys are integers (a Modbus profile's ``sentinels: {0x8000: ...}``)."""
        args = get_args(self.base) if get_origin(self.base) is dict else ()
        return bool(args) and TypeInfo.of(args[0]).base is int

    def item_type(self) -> Any:
        if get_origin(self.base) is list:
            return get_args(self.base)[0]
        return None

    def model_for(self, data: Mapping[Any, Any]) -> type[BaseModel] | None:
        models = self.models
        if self.discriminator is not None and self.discriminator in data:
            return _member_for_tag(models, self.discriminator, data[self.discriminator])
        return models[0] if len(models) == 1 else None


@dataclasses.dataclass(frozen=True, slots=True)
class LocInfo:
    """A pydantic error location read against the models: the path in the document and the field there."""

    data_path: KeyPath
    owner: type[BaseModel] | None
    """The model the last key belongs to (or should belong to)."""
    name: str | None
    field: FieldInfo | None
    expected: TypeInfo | None
    """The type expected at the end of the location."""
    union_models: tuple[type[BaseModel], ...] = ()
    discriminator: str | None = None

    @classmethod
    def walk(cls, root: type[BaseModel], loc: tuple[Any, ...]) -> LocInfo:
        info: TypeInfo | None = TypeInfo.of(root)
        data_path: list[str | int] = []
        owner: type[BaseModel] | None = None
        name: str | None = None
        field: FieldInfo | None = None
        expect_tag = False
        for elem in loc:
            models = info.models if info is not None else []
            if isinstance(elem, int):
                data_path.append(elem)
                item = info.item_type() if info is not None else None
                info = TypeInfo.of(item) if item is not None else None
                expect_tag = info is not None and info.discriminator is not None
                continue
            elem = str(elem)
            if expect_tag and info is not None and info.discriminator is not None:
                model = _member_for_tag(models, info.discriminator, elem)
                info = TypeInfo.of(model) if model is not None else None
                expect_tag = False
                continue
            data_path.append(elem)
            if len(models) == 1:
                owner, name = models[0], elem
                field = owner.model_fields.get(elem)
                info = TypeInfo.of(field_type(field)) if field is not None else None
                expect_tag = info is not None and info.discriminator is not None
            else:
                owner, name, field, info = None, elem, None, None
        if info is not None and info.discriminator is not None and expect_tag:
            return cls(tuple(data_path), owner, name, field, info, tuple(info.models), info.discriminator)
        return cls(tuple(data_path), owner, name, field, info)


def default_factory_path(model: type[BaseModel], title: str, depth: int = 0) -> KeyPath | None:
    """Where, under ``model``, a section defaults to a model named ``title``; () for ``model`` itself.

    A section whose default_factory fails raises its own error in place of the whole model's (pydantic
    behaviour): this finds the section, so those errors can be put under its key."""
    if depth == 0 and title == model.__name__:
        return ()
    if depth > MAX_DEPTH:
        return None
    for name, field in model.model_fields.items():
        factory = field.default_factory
        if isinstance(factory, type) and factory.__name__ == title:
            return (name,)
        for sub in TypeInfo.of(field.annotation).models:
            found = default_factory_path(sub, title, depth + 1)
            if found:
                return (name, *found)
    return None


def field_type(field: FieldInfo) -> Any:
    """The field's type, with its discriminator if it is a tagged union."""
    if isinstance(field.discriminator, str):
        return Annotated[field.annotation, Field(discriminator=field.discriminator)]
    return field.annotation


def is_secret_field(name: str, field: FieldInfo) -> bool:
    """A field whose value must never be shown: a SecretStr or SecretBytes, or a name that says secret."""
    return looks_secret(name) or any(
        isinstance(t, type) and issubclass(t, SecretStr | SecretBytes) for t in _leaf_types(field.annotation)
    )


def looks_secret(name: str) -> bool:
    lowered = name.lower()
    return any(part in lowered for part in _SECRET_NAME_PARTS)


def closest(word: str, choices: list[str]) -> str | None:
    matches = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return matches[0] if matches else None


def format_path(path: KeyPath) -> str:
    """``drivers[0].routes[1].kind``: how a key path is written in an issue."""
    text = ""
    for elem in path:
        text += f"[{elem}]" if isinstance(elem, int) else (f".{elem}" if text else elem)
    return text


# --- hints


def validation_hint(kind: str, error: Mapping[str, Any], loc: LocInfo) -> str | None:
    """What to do about one pydantic error (of type ``kind``) at ``loc``; else the field's description."""
    description = loc.field.description if loc.field is not None else None
    if kind == "extra_forbidden" and loc.owner is not None and loc.name is not None:
        names = list(loc.owner.model_fields)
        close = closest(loc.name, names)
        return f"did you mean {close!r}?" if close else f"allowed keys here: {', '.join(names)}"
    if kind == "missing" and loc.name is not None:
        if description:
            return f"add '{loc.name}': {description}"
        required = _required_keys(loc.expected)
        return f"add '{loc.name}' (a mapping with {', '.join(required)})" if required else f"add '{loc.name}'"
    if kind in ("literal_error", "enum"):
        allowed = _allowed_values(loc.expected)
        if allowed:
            return f"allowed values: {allowed}"
        return f"expected {error.get('ctx', {}).get('expected', '')}".strip() or description
    if kind in ("union_tag_not_found", "union_tag_invalid") and loc.discriminator is not None:
        tags = [t for m in loc.union_models for t in _allowed_tags(m, loc.discriminator)]
        shown = ", ".join(repr(t) for t in tags)
        if kind == "union_tag_not_found" and tags:
            return f"add '{loc.discriminator}: {tags[0]}' (one of: {shown})"
        return f"allowed values for '{loc.discriminator}': {shown}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        keys = _required_keys(loc.expected) or (
            list(loc.expected.models[0].model_fields) if loc.expected and loc.expected.models else []
        )
        if loc.discriminator is not None and loc.discriminator not in keys:
            keys.insert(0, loc.discriminator)
        if keys:
            return f"write a mapping with keys such as {', '.join(keys)}"
    if kind == "list_type":
        return "write a list (one '- ' item per line)" + (f"; {description}" if description else "")
    if kind == "string_type" and isinstance(error.get("input"), int | float | bool | dt.date):
        return "YAML read this as a number, boolean or date: put it in quotes" + (
            f"; {description}" if description else ""
        )
    return description


def _allowed_values(expected: TypeInfo | None) -> str | None:
    if expected is None:
        return None
    values = [v for t in _leaf_types(expected.base) if get_origin(t) is Literal for v in get_args(t)]
    return ", ".join(repr(v) for v in values) if values else None


def _required_keys(expected: TypeInfo | None) -> list[str]:
    if expected is None or len(expected.models) != 1:
        return []
    return [name for name, field in expected.models[0].model_fields.items() if field.is_required()]


# --- small helpers


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _member_for_tag(models: list[type[BaseModel]], discriminator: str, tag: Any) -> type[BaseModel] | None:
    for model in models:
        if tag in _allowed_tags(model, discriminator):
            return model
    return None


def _allowed_tags(model: type[BaseModel], discriminator: str) -> tuple[Any, ...]:
    field = model.model_fields.get(discriminator)
    if field is None:
        return ()
    base = TypeInfo.of(field.annotation).base
    return get_args(base) if get_origin(base) is Literal else ()


def _leaf_types(tp: Any) -> Iterator[Any]:
    info = TypeInfo.of(tp)
    if _is_union(info.base):
        for member in get_args(info.base):
            yield from _leaf_types(member)
    else:
        yield info.base
