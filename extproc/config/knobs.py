"""How one setting is declared and how a raw value (YAML, flag or environment) becomes typed.

A setting is a dataclass field made by ``knob``: its help text, its flat name (what the flag
``--flat-name`` and the environment variable ``EXTPROC_FLAT_NAME`` are made from) and any
legacy environment names live in the field's metadata, so the CLI, the loader and the generated
settings table read one declaration.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

ENV_PREFIX = "EXTPROC_"


class ConfigError(ValueError):
    """A bad setting; ``key`` names it the way the user wrote it (flag, env var or YAML key)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"invalid setting {key}: {message}")
        self.key = key
        self.detail = message


def knob(
    default: Any,
    help: str,
    *,
    name: str | None = None,
    env: tuple[str, ...] = (),
    cli: bool = True,
) -> Any:
    """A settings field. ``name`` is its flat name (default: ``<section>_<field>``)."""
    metadata = {"help": help, "env": env, "flat": name, "cli": cli}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def flat_name(section: str, f: dataclasses.Field[Any]) -> str:
    explicit: str | None = f.metadata.get("flat")
    if explicit:
        return explicit
    return f"{section}_{f.name}" if section else f.name


def flag_of(flat: str) -> str:
    return "--" + flat.replace("_", "-")


def env_of(flat: str, f: dataclasses.Field[Any]) -> tuple[str, ...]:
    """``EXTPROC_<FLAT>`` plus any legacy names the field accepts (e.g. ``ROUTING_ALGORITHM``)."""
    return (ENV_PREFIX + flat.upper(), *f.metadata.get("env", ()))


_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}


def convert(hint: Any, raw: Any, where: str) -> Any:
    """Coerce ``raw`` (a YAML value or an env/flag string) to ``hint``; errors name ``where``."""
    origin = get_origin(hint)
    args = get_args(hint)
    if origin is not None and type(None) in args:
        if raw is None or (isinstance(raw, str) and raw.lower() in ("", "none", "null")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return convert(inner, raw, where)
    converter = _CONVERTERS.get(hint)
    try:
        if origin is Literal:
            if raw not in args:
                choices = ", ".join(map(str, args))
                raise ValueError(f"must be one of {choices}, got {raw!r}")
            return raw
        if converter is not None:
            return converter(raw)
        if origin is dict:
            if isinstance(raw, str):
                raw = yaml.safe_load(raw)
            if not isinstance(raw, dict):
                raise ValueError("must be a mapping")
            return raw
    except (TypeError, ValueError) as exc:
        raise ConfigError(where, str(exc)) from None
    raise ConfigError(where, f"unsupported type {hint}")


def _to_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be true or false, got {raw!r}")


def _to_int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError("must be an integer")
    if isinstance(raw, int):
        return raw
    text = str(raw).strip()
    multipliers = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
    for suffix, factor in multipliers.items():
        if text.endswith(suffix):
            return int(text[: -len(suffix)]) * factor
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"must be an integer, got {raw!r}") from None


def _to_float(raw: Any) -> float:
    """Seconds, as a number or a string with ``ms``, ``s`` or ``m``."""
    if isinstance(raw, bool):
        raise ValueError("must be a number")
    if isinstance(raw, (int, float)):
        return float(raw)
    match = _DURATION.match(str(raw))
    if not match:
        raise ValueError(f"must be a number of seconds (or e.g. 100ms, 2s), got {raw!r}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _to_str(raw: Any) -> str:
    if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
        raise ValueError(f"must be a string, got {raw!r}")
    return str(raw)


_CONVERTERS: dict[Any, Callable[[Any], Any]] = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
    Path: lambda raw: Path(_to_str(raw)),
}
