"""``bcvk config show``: the effective configuration, defaults applied (pure)."""

from __future__ import annotations

import json
import re
from typing import Any

from bcvk.project.spec import KEYS, Project


def effective(project: Project) -> dict[str, Any]:
    """Each VM's values as ``up`` applies them (``[defaults]`` merged in, the
    kind spelled out, host paths absolute), keys in the schema's order."""
    order = list(KEYS)
    vms: dict[str, Any] = {}
    for vm in project.vms:
        values = {**vm.values, "kind": vm.kind.value}
        vms[vm.name] = {key: values[key] for key in order if key in values}
    return {"file": str(project.path), "vm": vms}


def to_toml(project: Project) -> str:
    """The effective configuration as a ``bcvk.toml`` that ``up`` reads back
    unchanged (strings, integers and arrays of strings are all it holds)."""
    data = effective(project)
    out = [f"# effective configuration of {data['file']}"]
    for name, values in data["vm"].items():
        out += ["", f"[vm.{_key(name)}]"]
        out += [f"{key} = {_value(value)}" for key, value in values.items()]
    return "\n".join(out) + "\n"


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _string(name)


def _value(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_string(v) for v in value) + "]"
    return str(value) if isinstance(value, int) else _string(str(value))


def _string(text: str) -> str:
    # A JSON string is a TOML basic string (the same escapes for '"', '\' and
    # control characters) once non-ASCII stays literal (TOML has no surrogate
    # pairs) and DEL, which JSON leaves bare, is escaped.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")
