"""``bcvk.toml``: the VMs a project wants, parsed once into typed options.

Every value goes through the parser its CLI flag uses (``libvirt
make_run_options`` and ``validate``, ``ephemeral make_options``), so the
file and the flags cannot disagree; an error names the file, the line and
the key.  Nothing here touches libvirt or starts a VM.
"""

from __future__ import annotations

import difflib
import enum
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bcvk import ephemeral, libvirt
from bcvk.errors import BcvkError, NotFoundError, UsageError
from bcvk.host import podman
from bcvk.values import format_size, validate_vm_name

FILE_NAME = "bcvk.toml"
T = TypeVar("T")


class Kind(enum.StrEnum):
    libvirt = "libvirt"  # a persistent VM (the default)
    ephemeral = "ephemeral"  # a throwaway VM, started detached


# key → (the TOML types it takes, what a wrong type is told, libvirt only?)
_Types = tuple[type, ...]
KEYS: dict[str, tuple[_Types, str, bool]] = {
    "kind": ((str,), 'kind = "libvirt" or "ephemeral"', False),
    "image": ((str,), 'image = "localhost/my-image:latest"', False),
    "memory": ((str, int), 'memory = "2G" (an integer is MiB)', False),
    "vcpus": ((int,), "vcpus = 2", False),
    "itype": ((str,), 'itype = "u1.small"', False),
    "disk-size": ((str,), 'disk-size = "20G"', True),
    "filesystem": ((str,), 'filesystem = "ext4"', True),
    "karg": ((str, list), 'karg = ["console=ttyS0"]', False),
    "port": ((str, list), 'port = ["8080:80"]', False),
    "bind": ((str, list), 'bind = ["./src:/srv"]', False),
    "bind-ro": ((str, list), 'bind-ro = ["./conf:/etc/app"]', False),
    "label": ((str, list), 'label = ["web"]', True),
    "firmware": ((str,), 'firmware = "uefi"', True),
    "ssh-key": ((str,), 'ssh-key = "./keys/id_ed25519"', True),
    "connect": ((str,), 'connect = "qemu:///system"', True),
}
LISTS = frozenset(k for k, (types, _, _) in KEYS.items() if list in types)
PATHS = frozenset({"bind", "bind-ro", "ssh-key"})


@dataclass(frozen=True)
class Vm:
    """One ``[vm.NAME]`` table with ``[defaults]`` applied, validated."""

    name: str
    kind: Kind
    values: Mapping[str, Any]  # the effective TOML values (paths made absolute)
    line: int  # of the [vm.NAME] header
    libvirt_options: libvirt.RunOptions | None
    ephemeral_options: ephemeral.Options | None

    @property
    def uri(self) -> str | None:
        connect = self.values.get("connect")
        return str(connect) if connect is not None else None

    def settings(self) -> dict[str, str]:
        """What ``status`` compares, as the user reads it (sizes formatted, so
        ``2048M`` and ``2G`` are the same setting)."""
        out: dict[str, str] = {"kind": self.kind.value, "image": str(self.values["image"])}
        if self.libvirt_options is not None:
            o = self.libvirt_options
            pairs: dict[str, object] = {
                "memory": format_size(o.memory) if o.memory else None,
                "vcpus": o.vcpus, "itype": o.itype, "disk-size": format_size(o.disk_size),
                "filesystem": o.filesystem.value if o.filesystem else None,
                "firmware": o.firmware.value, "ssh-key": o.ssh_key, "connect": self.uri,
                "karg": " ".join(o.kargs), "port": " ".join(str(p) for p in o.ports),
                "bind": " ".join(f"{s.source}:{s.target}" + (":ro" if s.readonly else "")
                                 for s in o.shares),
                "label": ",".join(o.labels),
            }  # fmt: skip
        else:
            e = self.ephemeral_options
            assert e is not None
            pairs = {
                "memory": format_size(e.memory_mib << 20), "vcpus": e.vcpus,
                "karg": " ".join(e.kargs), "port": " ".join(str(p) for p in e.ports),
                "bind": " ".join(f"{s.source}:{s.tag}" + (":ro" if s.readonly else "")
                                 for s in e.binds),
            }  # fmt: skip
        out.update({k: str(v) for k, v in pairs.items() if v not in (None, "")})
        return out


@dataclass(frozen=True)
class Project:
    path: Path  # absolute: the identity recorded in what `up` creates
    defaults: Mapping[str, Any]
    vms: tuple[Vm, ...]

    def select(self, names: tuple[str, ...]) -> tuple[Vm, ...]:
        """The VMs NAMES (all when empty), in the file's order."""
        known = {vm.name for vm in self.vms}
        for name in names:
            if name not in known:
                raise UsageError(
                    f"{self.path.name} has no VM named {name!r}",
                    hint=_did_you_mean(name, known) or f"its VMs: {', '.join(sorted(known))}",
                )
        return tuple(vm for vm in self.vms if not names or vm.name in names)

    def tag(self, vm: Vm) -> str:
        """VM's identity and settings as its domain or record keeps them (JSON)."""
        return json.dumps({"file": str(self.path), "vm": vm.name, "settings": vm.settings()},
                          sort_keys=True)  # fmt: skip


def find_file(given: str | None) -> Path:
    """-f FILE, else ./bcvk.toml."""
    path = Path(given) if given else Path.cwd() / FILE_NAME
    if not path.is_file():
        raise NotFoundError(
            f"{path}: no such file" if given else f"no {FILE_NAME} in {Path.cwd()}",
            hint="write one (see `bcvk up --help`) or name it with -f FILE",
        )
    return path.resolve()


def load(path: Path) -> Project:
    """Parse and validate PATH; raises UsageError naming the line and key."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path.name}: not UTF-8 text", hint="save it as UTF-8") from exc
    return parse(text, path)


def parse(text: str, path: Path) -> Project:
    lines = Lines(text)
    where = Where(path.name, lines)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib says "... (at line N, column M)": lead with the line instead.
        match = re.search(r"\(at line (\d+), column \d+\)$", str(exc))
        line = int(match.group(1)) if match else 1
        reason = str(exc)[: match.start()].strip() if match else str(exc)
        raise UsageError(f"{path.name}:{line}: invalid TOML: {reason}",
                         hint="see https://toml.io for the syntax") from exc  # fmt: skip
    for key in data:
        if key not in ("defaults", "vm"):
            raise where.error("", key, f"unknown table {key!r}",
                              _did_you_mean(key, {"defaults", "vm"}) or "use [defaults] and "
                              "[vm.NAME]")  # fmt: skip
    defaults = _table(where, data, "defaults")
    _check_keys(where, "defaults", defaults)
    vms = _table(where, data, "vm")
    if not vms:
        raise UsageError(f"{path.name}: no VMs", hint='add a table [vm.NAME] with image = "…"')
    parsed = []
    for name, table in vms.items():
        section = f"vm.{name}"
        if not isinstance(table, dict):
            raise where.error("vm", name, "expected a table", f"write [vm.{name}]")
        try:
            validate_vm_name(name)
        except UsageError as exc:
            raise where.error("vm", name, exc.message, exc.hint) from exc
        _check_keys(where, section, table)
        parsed.append(_vm(where, path.parent, name, defaults, table))
    return Project(path, defaults, tuple(parsed))


# ------------------------------------------------------------------ one VM


def _vm(where: Where, base: Path, name: str, defaults: dict[str, Any],
        table: dict[str, Any]) -> Vm:  # fmt: skip
    section = f"vm.{name}"
    values = {**defaults, **table}
    # Which table each effective value came from, for the error's line.
    origin = {k: (section if k in table else "defaults") for k in values}
    if "image" not in values:
        raise where.error("vm", name, "no image", f'add image = "…" to [{section}] or [defaults]')
    kind_text = values.get("kind", Kind.libvirt.value)
    try:
        kind = Kind(kind_text)
    except ValueError:
        raise where.error(
            origin["kind"],
            "kind",
            f"invalid kind {kind_text!r}",
            'kind = "libvirt" (persistent, the default) or "ephemeral"',
        ) from None
    for key in values:
        if kind is Kind.ephemeral and KEYS[key][2]:
            raise where.error(
                origin[key],
                key,
                "not an option of ephemeral VMs",
                f'it applies to kind = "libvirt"; remove it from [{origin[key]}]',
            )
    values = {k: _absolute(base, k, _listed(v) if k in LISTS else v) for k, v in values.items()}

    def validated(build: Callable[[dict[str, Any]], T]) -> T:
        # Each key alone first, so that an error names its key and line; then
        # all together, for what only their combination can get wrong.
        for key in values:
            if key not in ("kind", "image", "connect"):
                try:
                    build({key: values[key]})
                except BcvkError as exc:
                    message = _reword(exc.message, key)
                    raise where.error(origin[key], key, message, exc.hint) from exc
        try:
            return build(values)
        except BcvkError as exc:
            raise where.error("vm", name, exc.message, exc.hint) from exc

    try:
        podman.validate_reference(str(values["image"]))
    except UsageError as exc:
        raise where.error(origin["image"], "image", exc.message, exc.hint) from exc
    line = where.lines.header(section)
    image = str(values["image"])
    if kind is Kind.libvirt:

        def build_libvirt(subset: dict[str, Any]) -> libvirt.RunOptions:
            opts = libvirt.make_run_options(values.get("connect"), name=name,
                                            **_libvirt_args(subset))  # fmt: skip
            libvirt.validate(opts)
            return opts

        return Vm(name, kind, values, line, validated(build_libvirt), None)

    def build_ephemeral(subset: dict[str, Any]) -> ephemeral.Options:
        return ephemeral.make_options(image, name=name, detach=True, **_ephemeral_args(subset))

    return Vm(name, kind, values, line, None, validated(build_ephemeral))


def _listed(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _libvirt_args(v: dict[str, Any]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    if "memory" in v:
        args["memory"] = str(v["memory"])  # an integer is MiB, as --memory 2048
    for key, arg in (("disk-size", "disk_size"), ("vcpus", "vcpus"), ("itype", "itype"),
                     ("filesystem", "filesystem"), ("firmware", "firmware")):  # fmt: skip
        if key in v:
            args[arg] = v[key]
    for key, arg in (("karg", "kargs"), ("port", "ports"), ("bind", "binds"),
                     ("bind-ro", "binds_ro"), ("label", "labels")):  # fmt: skip
        if key in v:
            args[arg] = _listed(v[key])
    if "ssh-key" in v:
        args["ssh_key"] = Path(v["ssh-key"])
    return args


def _ephemeral_args(v: dict[str, Any]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for key in ("memory", "vcpus", "itype"):
        if key in v:
            args[key] = v[key]
    for key, arg in (("karg", "kargs"), ("port", "ports"), ("bind", "binds"),
                     ("bind-ro", "ro_binds")):  # fmt: skip
        if key in v:
            args[arg] = _listed(v[key])
    return args


def _absolute(base: Path, key: str, value: Any) -> Any:
    """Host paths in the file are relative to the file, not to where bcvk runs."""
    if key not in PATHS:
        return value
    if key == "ssh-key":
        return os.fspath(base / os.path.expanduser(value))
    return [
        os.fspath(base / os.path.expanduser(host)) + sep + rest
        for host, sep, rest in (item.partition(":") for item in _listed(value))
    ]


def _reword(message: str, key: str) -> str:
    """A parser's message names its CLI flag; in the file, the key is the name."""
    flags = {"vcpus": ("--cpus", "--vcpus"), "bind-ro": ("--bind-ro", "--ro-bind")}
    for flag in (*flags.get(key, ()), f"--{key}"):
        message = message.replace(flag, key)
    return message


# ------------------------------------------------------------------ checks


def _table(where: Where, data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise where.error("", key, "expected a table", f"write [{key}]")
    return value


def _check_keys(where: Where, section: str, table: dict[str, Any]) -> None:
    for key, value in table.items():
        if key not in KEYS:
            raise where.error(
                section,
                key,
                f"unknown key {key!r}",
                _did_you_mean(key, KEYS) or f"keys: {', '.join(sorted(KEYS))}",
            )
        types, example, _ = KEYS[key]
        ok = isinstance(value, types) and not isinstance(value, bool)
        if ok and isinstance(value, list):
            ok = all(isinstance(item, str) for item in value)
        if not ok:
            raise where.error(section, key, f"unexpected {_toml_type(value)}",
                              f"e.g. {example}")  # fmt: skip


def _toml_type(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
             dict: "table"}  # fmt: skip
    if isinstance(value, list) and all(isinstance(v, str) for v in value) is False:
        return "array with a non-string item"
    return names.get(type(value), type(value).__name__)


def _did_you_mean(word: str, choices: Any) -> str | None:
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f"did you mean {close[0]!r}?" if close else None


# ------------------------------------------------------------------ lines


class Lines:
    """Where each table header and key sits in the text (tomllib keeps no
    positions): enough for errors to name the line."""

    _HEADER = re.compile(r"\s*\[\s*([^\[\]]+?)\s*\]\s*(?:#.*)?$")
    _KEY = re.compile(r"\s*(\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+)\s*=")

    def __init__(self, text: str) -> None:
        self.headers: dict[str, int] = {}
        self.keys: dict[tuple[str, str], int] = {}
        section = ""
        for number, line in enumerate(text.splitlines(), 1):
            if header := self._HEADER.match(line):
                section = ".".join(p.strip().strip("\"'") for p in header.group(1).split("."))
                self.headers.setdefault(section, number)
            elif key := self._KEY.match(line):
                self.keys.setdefault((section, key.group(1).strip("\"'")), number)

    def header(self, section: str) -> int:
        return self.headers.get(section, 1)

    def key(self, section: str, key: str) -> int:
        if found := self.keys.get((section, key)):
            return found
        dotted = f"{section}.{key}".lstrip(".")
        # A table's own header, else the first of its subtables ([vms.db] for vms).
        for name, line in self.headers.items():
            if name == dotted or name.startswith(dotted + "."):
                return line
        return self.header(section)


@dataclass(frozen=True)
class Where:
    name: str
    lines: Lines

    def error(self, section: str, key: str, message: str, hint: str | None) -> BcvkError:
        dotted = f"{section}.{key}" if section else key
        line = self.lines.key(section, key)
        return UsageError(f"{self.name}:{line}: {dotted}: {message}",
                          hint=hint or "see `bcvk up --help`")  # fmt: skip
