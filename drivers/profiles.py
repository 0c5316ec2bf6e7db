"""Device profiles: declarative YAML in ``firmware_configs/profiles/`` that says how a kind of device talks.

A device in the config names a profile (``profile: dixell-xr``); the profile holds the register map, the
BLE format, the serial framing or the MQTT payload mapping. Each driver family defines its profile model
as a subclass of :class:`ProfileBase` and looks profiles up with :func:`get_profile`. Every profile says
where its facts come from and how far to trust them (``confidence``).

Profiles are read once per process (shipped with the package as ``firmware_configs/profiles/*.yaml``,
plus any ``*.yaml`` in the directory named by ``STORE_GATEWAY_PROFILES``, which may override a shipped one).
"""

from __future__ import annotations

import difflib
import functools
import os
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

PROFILES_ENV: Final = "STORE_GATEWAY_PROFILES"
PROFILE_NAME: Final = r"^[a-z0-9][a-z0-9._-]{0,63}$"

Family = Literal["mqtt", "serial", "modbus", "ble", "http"]
Confidence = Literal["verified on hardware", "from vendor manual", "third-party map: verify"]


class ProfileBase(BaseModel):
    """Fields every profile has; a family's model adds its own (and narrows ``family``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    profile: str = Field(pattern=PROFILE_NAME, description="The name devices use; the file is <name>.yaml.")
    family: Family = Field(description="Which driver family reads devices of this profile.")
    vendor: str = Field(min_length=1, max_length=100)
    model: str = Field(min_length=1, max_length=200, description="Models and firmware this covers.")
    description: str = Field(default="", max_length=2000)
    source: str = Field(
        min_length=1, max_length=1000, description="Where the facts come from: manual, spec, reference code."
    )
    confidence: Confidence = Field(description="How far to trust the map before checking it on a device.")


class ProfileError(Exception):
    """A profile file that cannot be used (bad YAML, unknown family, invalid fields)."""


P = TypeVar("P", bound=ProfileBase)


def profile_dirs() -> list[Path]:
    """Where profiles are read from, in order: the shipped ones, then ``$STORE_GATEWAY_PROFILES``."""
    shipped = Path(str(resources.files("firmware_configs") / "profiles"))
    extra = os.environ.get(PROFILES_ENV)
    return [shipped, Path(extra)] if extra else [shipped]


@functools.cache
def _raw_profiles(dirs: tuple[Path, ...]) -> dict[str, tuple[Path, dict[str, Any]]]:
    yaml = YAML(typ="safe", pure=True)
    found: dict[str, tuple[Path, dict[str, Any]]] = {}
    for folder in dirs:
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.yaml")):
            try:
                data = yaml.load(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, YAMLError) as exc:
                raise ProfileError(f"{path}: cannot read the profile: {exc}") from exc
            if not isinstance(data, dict) or data.get("profile") != path.stem:
                raise ProfileError(
                    f"{path}: a profile is a mapping whose 'profile' is the file name, {path.stem!r}"
                )
            found[path.stem] = (path, data)
    return found


def available(family: Family | None = None) -> dict[str, Path]:
    """Profile names (of one family, or all) and their files."""
    raw = _raw_profiles(tuple(profile_dirs()))
    return {n: p for n, (p, d) in raw.items() if family is None or d.get("family") == family}


def get_profile(name: str, model: type[P]) -> P:
    """The named profile validated by ``model``; :class:`ProfileError` (with a hint) if there is none."""
    return cast(P, _validated(name, model, tuple(profile_dirs())))


@functools.cache
def _validated(name: str, model: type[P], dirs: tuple[Path, ...]) -> P:
    raw = _raw_profiles(dirs)
    family = model.model_fields["family"].default
    entry = raw.get(name)
    if entry is None or (isinstance(family, str) and entry[1].get("family") != family):
        names = sorted(
            n for n, (_, d) in raw.items() if not isinstance(family, str) or d.get("family") == family
        )
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ProfileError(f"no {family or ''} profile {name!r}: {hint}known: {', '.join(names) or 'none'}")
    path, data = entry
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        raise ProfileError(f"{path}: {problems}") from exc


def check_profile(name: str, model: type[P]) -> str:
    """For a config field validator: the name if the profile exists and is valid, else ValueError with a hint."""
    try:
        get_profile(name, model)
    except ProfileError as exc:
        raise ValueError(str(exc)) from exc
    return name
