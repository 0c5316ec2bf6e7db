"""Device profiles: declarative YAML in ``firmware_configs/profiles/`` that says how a kind of device talks.

A device in the config names a profile (``profile: dixell-xr``); the profile holds the register map, the
BLE format, the serial framing or the MQTT payload mapping. Each driver family defines its profile model
as a subclass of :class:`ProfileBase` and looks profiles up with :func:`get_profile`. Every profile says
where its facts come from and how far to trust them (``confidence``).

Profiles are read once per process (shipped with the package as ``firmware_configs/profiles/*.yaml``,
plus any ``*.yaml`` in the directory named by ``STORE_GATEWAY_PROFILES``, which may override a shipped one),
with the loader the store config uses (:mod:`gateway.kernel.loader`): a broken profile is reported like a
broken config, every problem with ``file:line:col``, the key path and a hint.

A profile decides how a device's messages are read, so whoever can write one can change what reaches HQ (or
turn a kiosk's biometric refusal off). The ``STORE_GATEWAY_PROFILES`` folder, every folder above it and every
profile in it must therefore belong to root or to the gateway's own user and not be writable by group or
others (a folder above may be world-writable with the sticky bit, like /tmp), or no profile is read at all.
Each override of a shipped profile is logged at WARNING, and may not change what kind of device it reads
(:data:`KEPT_BY_OVERRIDES`).
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import stat
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple, TypeVar, cast

from pydantic import Field

from gateway.kernel.errors import StoreGatewayError
from gateway.kernel.loader import DocumentError, DocumentKind, DocumentLoader, Issue
from gateway.kernel.model import StrictModel

_LOGGER = logging.getLogger(__name__)

PROFILES_ENV: Final = "STORE_GATEWAY_PROFILES"
PROFILE_NAME: Final = r"^[a-z0-9][a-z0-9._-]{0,63}$"
KEPT_BY_OVERRIDES: Final = ("family", "decoder")
"""Fields an override must keep from the shipped profile it replaces: an override changes the details of how a
kind of device is read, never the kind (the kiosk's ``decoder: checkin`` is what refuses biometric data and
keeps kiosk payloads out of the quarantine)."""
_OTHERS_WRITE: Final = stat.S_IWGRP | stat.S_IWOTH
MAX_PROFILE_BYTES: Final = 1024 * 1024
"""The largest shipped profile is a few KiB."""
PROFILE: Final = DocumentKind("profile", "a shipped profile in firmware_configs/profiles/", MAX_PROFILE_BYTES)

Family = Literal["mqtt", "serial", "modbus", "ble", "http"]
Confidence = Literal["verified on hardware", "from vendor manual", "third-party map: verify"]


class ProfileBase(StrictModel):
    """Fields every profile has; a family's model adds its own (and narrows ``family``)."""

    profile: str = Field(pattern=PROFILE_NAME, description="The name devices use; the file is <name>.yaml.")
    family: Family = Field(description="Which driver family reads devices of this profile.")
    vendor: str = Field(min_length=1, max_length=100)
    model: str = Field(min_length=1, max_length=200, description="Models and firmware this covers.")
    description: str = Field(default="", max_length=2000)
    source: str = Field(
        min_length=1, max_length=1000, description="Where the facts come from: manual, spec, reference code."
    )
    confidence: Confidence = Field(description="How far to trust the map before checking it on a device.")


class ProfileError(StoreGatewayError):
    """A profile file that cannot be used (bad YAML, unknown family, invalid fields); ``issues`` lists each
    problem in the file, with its line, when there are such."""

    def __init__(self, message: str, issues: Sequence[Issue] = ()) -> None:
        super().__init__(message)
        self.issues = list(issues)


class _Found(NamedTuple):
    """A profile file as read: its top mapping (positions kept) and its bytes, validated on first use."""

    path: Path
    data: dict[str, Any]
    raw: bytes


P = TypeVar("P", bound=ProfileBase)


def profile_dirs() -> list[Path]:
    """Where profiles are read from, in order: the shipped ones, then ``$STORE_GATEWAY_PROFILES``."""
    shipped = Path(str(resources.files("firmware_configs") / "profiles"))
    extra = os.environ.get(PROFILES_ENV)
    return [shipped, Path(extra)] if extra else [shipped]


@functools.cache
def _raw_profiles(dirs: tuple[Path, ...]) -> dict[str, _Found]:
    """Every profile by name; the first folder is the shipped one, the others are checked before use."""
    found: dict[str, _Found] = {}
    for index, folder in enumerate(dirs):
        if not folder.is_dir():
            continue
        shipped = index == 0
        if not shipped:
            _check_folder(folder)
        for path in sorted(folder.glob("*.yaml")):
            try:
                raw = path.read_bytes() if shipped else _read_checked(path)
            except OSError as exc:
                raise ProfileError(f"{path}: cannot read the profile: {exc}") from exc
            profile = _Found(path, _read_profile(path, raw), raw)
            replaced = found.get(path.stem)
            if replaced is not None:
                _check_override(path, profile.data, replaced.path, replaced.data)
                _LOGGER.warning("profile %s: %s overrides the shipped %s", path.stem, path, replaced.path)
            found[path.stem] = profile
    return found


def _read_profile(path: Path, raw: bytes) -> dict[str, Any]:
    """The profile's top mapping; ProfileError with every located problem if it is not readable YAML or its
    ``profile`` is not the file's name."""
    loader = DocumentLoader(path, PROFILE)
    try:
        data: dict[str, Any] = loader.read(raw)
        if data.get("profile") != path.stem:
            raise loader.fail(
                ("profile",),
                f"a profile's 'profile' is its file name, {path.stem!r}",
                f"write 'profile: {path.stem}', or rename the file",
                value=data.get("profile"),
            )
    except DocumentError as exc:
        raise ProfileError(str(exc), exc.issues) from exc
    return data


def _check_folder(folder: Path) -> None:
    """ProfileError unless only root and this user can change what ``folder`` holds: the folder itself, and the
    folders above it (as named, and after symlinks), whose writers could swap it for another."""
    real = folder.resolve()
    try:
        _check_owner_and_mode(folder, os.stat(folder), f"the profiles folder {folder}", sticky_ok=False)
        for parent in dict.fromkeys([*folder.absolute().parents, *real.parents]):
            where = f"{parent}, a folder above the profiles folder {folder},"
            _check_owner_and_mode(parent, os.stat(parent), where, sticky_ok=True)
    except OSError as exc:
        raise ProfileError(f"the profiles folder {folder} ({PROFILES_ENV}) cannot be checked: {exc}") from exc


def _read_checked(path: Path) -> bytes:
    """The bytes of an override profile, checked on the open file (a swap after the check changes nothing)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO named *.yaml must not hang the start
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ProfileError(f"{path}: a profile is a regular file")
        _check_owner_and_mode(path, info, f"the profile {path}", sticky_ok=False)
        return fh.read(MAX_PROFILE_BYTES + 1)


def _check_owner_and_mode(path: Path, info: os.stat_result, name: str, *, sticky_ok: bool) -> None:
    me = os.geteuid()
    if info.st_uid not in (0, me):
        raise ProfileError(
            f"{name} ({PROFILES_ENV}) belongs to another user (uid {info.st_uid}), who could change how devices"
            f" are read: give it to root or to the gateway's user (chown {me} {path}), then chmod go-w {path}"
        )
    if info.st_mode & _OTHERS_WRITE and not (sticky_ok and info.st_mode & stat.S_ISVTX):
        raise ProfileError(
            f"{name} ({PROFILES_ENV}) can be written by other users, who could change how devices are read:"
            f" chmod go-w {path}"
        )


def _check_override(path: Path, data: dict[str, Any], shipped_path: Path, shipped: dict[str, Any]) -> None:
    for key in KEPT_BY_OVERRIDES:
        if key in shipped and data.get(key) != shipped[key]:
            why = ""
            if key == "decoder" and shipped[key] == "checkin":
                why = " (the checkin decoder refuses biometric data and keeps kiosk payloads out of the quarantine)"
            raise ProfileError(
                f"{path}: overrides the shipped profile {path.stem} ({shipped_path}) but changes its {key}"
                f" from {shipped[key]!r} to {data.get(key)!r}{why}: an override may change how a kind of device"
                f" is read, not the kind; give the profile another name"
            )


def available(family: Family | None = None) -> dict[str, Path]:
    """Profile names (of one family, or all) and their files."""
    raw = _raw_profiles(tuple(profile_dirs()))
    return {n: p.path for n, p in raw.items() if family is None or p.data.get("family") == family}


def get_profile(name: str, model: type[P]) -> P:
    """The named profile validated by ``model``; :class:`ProfileError` (with a hint) if there is none."""
    return cast(P, _validated(name, model, tuple(profile_dirs())))


@functools.cache
def _validated(name: str, model: type[P], dirs: tuple[Path, ...]) -> P:
    raw = _raw_profiles(dirs)
    family = model.model_fields["family"].default
    entry = raw.get(name)
    if entry is None or (isinstance(family, str) and entry.data.get("family") != family):
        names = sorted(
            n for n, p in raw.items() if not isinstance(family, str) or p.data.get("family") == family
        )
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ProfileError(f"no {family or ''} profile {name!r}: {hint}known: {', '.join(names) or 'none'}")
    try:
        return DocumentLoader(entry.path, PROFILE).load(model, entry.raw)
    except DocumentError as exc:
        raise ProfileError(str(exc), exc.issues) from exc


def check_profile(name: str, model: type[P]) -> str:
    """For a config field validator: the name if the profile exists and is valid, else ValueError with a hint
    (one line: the problems in the profile file, each with its line, are joined with '; ')."""
    try:
        get_profile(name, model)
    except ProfileError as exc:
        raise ValueError("; ".join(str(i) for i in exc.issues) if exc.issues else str(exc)) from exc
    return name
