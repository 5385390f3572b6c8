"""The mechanics of a strict, typed config; :mod:`xfer.config` holds its contents.

- :class:`Strict`: the base of every section: unknown keys are errors, values frozen.
- :func:`parse_overrides` and :func:`merge`: ``section.key=value`` strings (values
  parse as YAML) into nested dicts, laid over the file's.
- :func:`format_errors`: pydantic's errors in one line, each naming the key, where it
  came from (the file or an override), and the closest known key for a misspelling.
- :func:`keys_set`: the keys a file or an override gave (not left at their defaults).
- :func:`redact`: secret-looking keys and credentials in URLs masked, for anything
  written out.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from xfer.errors import ConfigError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``; values parse as YAML."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if (
            not sep
            or not key
            or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key)
        ):
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {item!r} conflicts with an earlier override of {part!r}"
                )
            node = child
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def flatten_keys(d: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for k, v in d.items():
        path = f"{prefix}{k}"
        keys.add(path)
        if isinstance(v, dict):
            keys |= flatten_keys(v, path + ".")
    return keys


def keys_set(model: BaseModel, prefix: str = "") -> list[str]:
    """Dotted keys given in the input (file or override) of a validated ``model``:
    ``["output.model_name", "score.num_actors"]``; a section given empty is itself a key."""
    out: list[str] = []
    for name in sorted(model.model_fields_set):
        value = getattr(model, name)
        if isinstance(value, BaseModel) and value.model_fields_set:
            out += keys_set(value, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: Any = root
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return None
    return model


def format_errors(
    exc: ValidationError, source: str, override_keys: set[str], root: type[BaseModel]
) -> str:
    """One line: each problem naming the key, where it came from, and a likely fix."""
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        # Union branches add their type names to the location; drop them.
        loc = tuple(
            p for p in loc if not (isinstance(p, str) and p in {"str", "int", "float", "bool"})
        )
        key = ".".join(str(p) for p in loc) or "(top level)"
        where = f"command-line override {key}=..." if key in override_keys else source
        if err["type"] == "extra_forbidden":
            parent = _model_at(root, loc[:-1])
            hint = ""
            retired = getattr(parent, "RETIRED", {}) if parent is not None else {}
            if str(loc[-1]) in retired:
                hint = f" ({retired[str(loc[-1])]})"
            elif parent is not None:
                close = difflib.get_close_matches(str(loc[-1]), list(parent.model_fields), n=1)
                if close:
                    hint = f" (did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?)"
                else:
                    hint = f" (known keys: {', '.join(parent.model_fields)})"
            lines.append(f"unknown key {key!r} in {where}{hint}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
            lines.append(f"{key}: {msg}{shown} in {where}")
    return "invalid config: " + "; ".join(lines)


_SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|private_key|access_key)", re.I)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)


def redact(value: Any, key: str = "") -> Any:
    """Mask secret-looking keys and credentials embedded in URLs."""
    if isinstance(value, dict):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if _SECRET_KEY.search(key) and value not in (None, ""):
        return "***"
    if isinstance(value, str):
        return _URL_USERINFO.sub(r"\g<scheme>***@", value)
    return value
