"""The agent's ``config.toml`` as a person reads it: every setting, its default and a comment.

``init`` and ``enroll`` write it. Settings given a value (the enrollment's relay URL, agent id,
relay id, data dir, listen address, or whatever an older file held) are written as live TOML
keys; every other setting is written commented out with its default, so that a later version's
better default applies to a file nobody edited, and the file still documents the whole
``AgentConfig`` (DESIGN §Command line: file < env < flag).

Comments come from the attribute docstrings of ``shared/config.py``, so a new setting appears
here with its own documentation.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.config import AgentConfig

__all__ = ["render_config", "unknown_keys"]

# Comments for settings that have no attribute docstring in shared/config.py.
_EXTRA_DOCS = {
    "AgentConfig.agent_id": "This agent's id at the relay (written by enroll).",
    "AgentConfig.data_dir": "Holds the key, the local token, this file, the inbox and agent.json.",
    "AgentConfig.backoff_max": "Longest reconnect delay in seconds.",
    "AgentConfig.log_level": "debug, info, warning, error or critical.",
    "AgentConfig.log_format": "text for a console, json (one object per line) for machines.",
}

_HEADER = """\
# X-on relay agent configuration (xon-relay-agent).
#
# Lines starting with "# name = value" show a setting's default; remove the "# " to change it.
# Precedence: command-line flag > environment (XON_RELAY_AGENT_<NAME>, sections as
# XON_RELAY_AGENT_<SECTION>_<NAME>) > this file > default. Durations are seconds, sizes bytes;
# "none" disables an optional limit. An unknown key is an error.
"""

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _docs(cls: type) -> dict[str, str]:
    """Field name → its attribute docstring on one line, read from the class source."""
    docs: dict[str, str] = {}
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):  # no source (a frozen build): extra docs only
        tree = None
    if tree is not None and isinstance(tree.body[0], ast.ClassDef):
        body = tree.body[0].body
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                text = " ".join(following.value.value.split())
                docs[node.target.id] = text.replace("``None``", '"none"').replace("``", "")
    for key, text in _EXTRA_DOCS.items():
        owner, _, name = key.partition(".")
        if owner == cls.__name__:
            docs.setdefault(name, text)
    return docs


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else json.dumps(name)


def _value(value: Any) -> str:
    """A TOML value. ``None`` is ``"none"``: TOML has no null and the loader maps it back."""
    match value:
        case None:
            return '"none"'
        case bool():
            return "true" if value else "false"
        case int() | float():
            return repr(value)
        case str() | Path():
            # A JSON string is a valid TOML basic string for everything json.dumps emits.
            return json.dumps(str(value), ensure_ascii=False)
        case list() | tuple():
            return "[" + ", ".join(_value(v) for v in value) + "]"
        case dict():
            items = ", ".join(f"{_key(str(k))} = {_value(v)}" for k, v in value.items())
            return "{ " + items + " }" if items else "{}"
        case _ if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return _value({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _is_section(default: object) -> bool:
    return dataclasses.is_dataclass(default) and not isinstance(default, type)


def _lines(obj: Any, values: Mapping[str, Any]) -> tuple[list[str], list[tuple[str, Any]]]:
    """Lines for the plain settings of ``obj``; its sections are returned for later tables."""
    docs = _docs(type(obj))
    lines: list[str] = []
    sections: list[tuple[str, Any]] = []
    for f in dataclasses.fields(obj):
        default = getattr(obj, f.name)
        if _is_section(default):
            sections.append((f.name, default))
            continue
        lines.append("")
        lines.append(f"# {docs.get(f.name, f.name.replace('_', ' ') + '.')}")
        if f.name in values:
            lines.append(f"{_key(f.name)} = {_value(values[f.name])}")
        else:
            lines.append(f"# {_key(f.name)} = {_value(default)}")
    return lines, sections


def render_config(values: Mapping[str, Any]) -> str:
    """The commented ``config.toml`` text.

    Args:
        values: settings to write live, shaped like the TOML data (sections as nested
            mappings: ``{"relay_url": ..., "link": {"window": 64}}``). Keys that are not
            ``AgentConfig`` settings are left out (see :func:`unknown_keys`).
    """
    lines, sections = _lines(AgentConfig(), values)
    out = [_HEADER.rstrip("\n"), *lines]
    while sections:
        name, default = sections.pop(0)
        sub: Any = values
        for part in name.split("."):
            sub = sub.get(part) if isinstance(sub, Mapping) else None
        section_lines, inner = _lines(default, sub if isinstance(sub, Mapping) else {})
        out += ["", "", f"[{name}]", *section_lines[1:]]
        sections[:0] = [(f"{name}.{child}", value) for child, value in inner]
    return "\n".join(out) + "\n"


def unknown_keys(values: Mapping[str, Any]) -> list[str]:
    """Keys of ``values`` that :func:`render_config` leaves out, dotted (``link.x``)."""
    defaults = AgentConfig()
    unknown: list[str] = []
    names = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults)}
    for name, value in values.items():
        if name not in names:
            unknown.append(name)
        elif _is_section(names[name]) and isinstance(value, Mapping):
            inner = {f.name for f in dataclasses.fields(names[name])}
            unknown += [f"{name}.{k}" for k in value if k not in inner]
    return unknown
