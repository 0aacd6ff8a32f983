"""A TOML recipe file as a raw mapping, `key=value` overrides on it, and its validation with readable errors.

The schema itself is `fedpeft.config`; loading that also checks a method's options is `fedpeft.app.recipe`.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from fedpeft.config import Config, ConfigError

# Keys renamed when byte figures became binary units: an old recipe gets the new name, not a bare "unknown key".
RENAMED = {
    "sim.comm_budget_mb": "sim.comm_budget_mib",
    "sim.max_reply_mb": "sim.max_reply_mib",
    "sim.object_store_mb": "sim.object_store_mib",
}


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden" and key in RENAMED:
            lines.append(f"{key} was renamed {RENAMED[key]} (MiB = 2^20 bytes)")
        elif e["type"] == "extra_forbidden":
            section = _section_for(e["loc"][:-1])
            allowed = ", ".join(sorted(section.model_fields)) if section else "?"
            lines.append(f"unknown key '{key}' (allowed here: {allowed})")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _section_for(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def schema_validate(raw: dict[str, Any]) -> Config:
    """Validate a raw mapping against the schema (sections, keys, value ranges); ConfigError names each problem."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value` into a key path and a TOML-typed value (bare words stay strings)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value (e.g. train.lr=3e-4)")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override '{item}' has an empty key part")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each `key=value` override applied."""
    out = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{part}' is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return out


def read_recipe(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """A TOML recipe as a raw mapping with each `key=value` override applied."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe file not found: {p}")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"recipe {p} is not valid TOML: {err}") from None
    return apply_overrides(raw, overrides or [])
