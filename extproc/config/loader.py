"""Building ``Settings`` from flags, environment variables and the YAML file.

Precedence: command-line flag > environment variable > YAML file > default. A value is
converted where it was read, so a bad one is reported under the name the user wrote
(``--scrape-interval``, ``EXTPROC_SCRAPE_INTERVAL`` or ``scraping.interval (in pods.yaml)``);
a check that fails later, inside a section, is reported the same way.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from extproc.config.knobs import ConfigError, convert, env_of, flag_of, flat_name
from extproc.config.settings import SECTIONS, Settings, UsersSettings

DATA_KEYS = frozenset({"pods", "models"})
"""Top-level YAML keys that are data for discovery, not settings."""
ROOT = ""


@dataclass(frozen=True)
class Knob:
    """One setting: where it lives (``section``, ``field``) and its flat name."""

    section: str
    field: dataclasses.Field[Any]
    hint: Any
    flat: str

    @property
    def path(self) -> str:
        """The YAML key: ``section.field``, or the field alone at the top level."""
        return f"{self.section}.{self.field.name}" if self.section else self.field.name

    @property
    def flag(self) -> str:
        return flag_of(self.flat)

    @property
    def envs(self) -> tuple[str, ...]:
        return env_of(self.flat, self.field)

    @property
    def help(self) -> str:
        text: str = self.field.metadata["help"]
        return text

    @property
    def on_cli(self) -> bool:
        return bool(self.field.metadata.get("cli", True))


def knobs() -> Iterator[Knob]:
    """Every setting, top-level ones first, then section by section."""
    root_hints = get_type_hints(Settings)
    for f in dataclasses.fields(Settings):
        if f.name not in SECTIONS:
            yield Knob(ROOT, f, root_hints[f.name], flat_name(ROOT, f))
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield Knob(section, f, hints[f.name], flat_name(section, f))


def by_flat_name() -> dict[str, Knob]:
    return {knob.flat: knob for knob in knobs()}


def load(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    strategy_option_flags: list[str] | None = None,
) -> Settings:
    """Build and validate the settings. ``flags`` maps flat names to CLI values (strings or
    already typed). Raises ``ConfigError`` naming the offending key as the user wrote it."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    environ = os.environ if environ is None else environ
    table = by_flat_name()
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}

    config_path = flags.get("config")
    if config_path is None:
        for env in table["config"].envs:
            if environ.get(env):
                config_path = environ[env]
                break
    if config_path is not None:
        _read_document(Path(config_path), values, origin)

    for knob in table.values():
        if knob.flat == "config":
            continue
        for env in knob.envs:
            if environ.get(env, "") != "":
                values[knob.path] = convert(knob.hint, environ[env], env)
                origin[knob.path] = env
                break

    for name, raw in flags.items():
        given = table.get(name)
        if given is None:
            raise ConfigError(flag_of(name), "unknown setting")
        values[given.path] = convert(given.hint, raw, given.flag)
        origin[given.path] = given.flag

    if strategy_option_flags:
        _strategy_options(strategy_option_flags, values, origin)
    return _build(values, origin)


def _read_document(path: Path, values: dict[str, Any], origin: dict[str, str]) -> None:
    document = read_yaml(path)
    where = f"(in {path})"
    root = {k.field.name: k for k in knobs() if not k.section}
    for key, raw in document.items():
        if key in DATA_KEYS:
            continue
        if key in SECTIONS:
            if raw is None:
                continue
            if not isinstance(raw, dict):
                raise ConfigError(f"{key} {where}", "must be a mapping of settings")
            section_knobs = {k.field.name: k for k in knobs() if k.section == key}
            for name, value in raw.items():
                knob = section_knobs.get(name)
                if knob is None:
                    raise ConfigError(
                        f"{key}.{name} {where}",
                        f"unknown key; {key} settings are: {', '.join(section_knobs)}",
                    )
                _put(knob, value, f"{knob.path} {where}", values, origin)
            continue
        knob = root.get(key)
        if knob is None or key == "config":
            sections = ", ".join(SECTIONS)
            raise ConfigError(
                f"{key} {where}",
                f"unknown key; the top level holds pods, models, mode and the sections {sections} "
                "(docs/configuration.md)",
            )
        _put(knob, raw, f"{key} {where}", values, origin)
    values["config"] = path


def _put(knob: Knob, raw: Any, where: str, values: dict[str, Any], origin: dict[str, str]) -> None:
    values[knob.path] = convert(knob.hint, raw, where)
    origin[knob.path] = where


def _strategy_options(items: list[str], values: dict[str, Any], origin: dict[str, str]) -> None:
    path = "routing.strategies"
    options = {k: dict(v) for k, v in values.get(path, {}).items()}
    for item in items:
        key, sep, text = item.partition("=")
        strategy, dot, option = key.partition(".")
        if not sep or not dot or not strategy or not option:
            raise ConfigError("--strategy-option", f"expected NAME.OPTION=VALUE, got {item!r}")
        options.setdefault(strategy, {})[option] = yaml.safe_load(text)
    values[path] = options
    origin[path] = "--strategy-option"


def _build(values: dict[str, Any], origin: dict[str, str]) -> Settings:
    sections: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        prefix = section + "."
        fields = {p[len(prefix) :]: v for p, v in values.items() if p.startswith(prefix)}
        try:
            sections[section] = cls(**fields)
        except ConfigError as exc:
            raise _named(exc, section, origin) from None
    users: UsersSettings = sections["users"]
    if users.host is None:
        # An API without a token stays on loopback; with one it follows the server's host.
        host = sections["server"].host if users.admin_token else "127.0.0.1"
        sections["users"] = dataclasses.replace(users, host=host)
    root = {p: v for p, v in values.items() if "." not in p}
    try:
        return Settings(**root, **sections)
    except ConfigError as exc:
        raise _named(exc, ROOT, origin) from None


def _named(exc: ConfigError, section: str, origin: Mapping[str, str]) -> ConfigError:
    """``exc`` under the name the user wrote for the key (a flag, env var or YAML key)."""
    head, dot, rest = exc.key.partition(".")
    path = f"{section}.{head}" if section else head
    where = origin.get(path, path)
    if dot:
        name, sep, file = where.partition(" (in ")
        joiner = " " if name.startswith("-") or name.isupper() else "."
        where = f"{name}{joiner}{rest}" + (f" (in {file}" if sep else "")
    return ConfigError(where, exc.detail)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read the YAML settings/pods file; an empty file is an empty mapping."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("config", f"{path} is not valid YAML: {exc}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError("config", f"{path} must hold a mapping at the top level")
    return document


def describe() -> list[tuple[str, str, str, str, str]]:
    """``(yaml key, flag, env vars, default, help)`` rows for the settings table."""
    defaults = Settings()
    rows = []
    for knob in knobs():
        holder = getattr(defaults, knob.section) if knob.section else defaults
        rows.append(
            (
                knob.path,
                knob.flag if knob.on_cli else "--strategy-option",
                ", ".join(knob.envs),
                repr(getattr(holder, knob.field.name)),
                knob.help,
            )
        )
    return rows
