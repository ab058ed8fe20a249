"""VMs as code: ``bcvk up`` / ``down`` / ``status`` / ``ssh`` for a ``bcvk.toml``.

The file says which VMs a project wants (``spec``); libvirt's domains (and
the ephemeral registry, for ``kind = "ephemeral"``) are the only record of
what exists.  Each VM ``up`` makes carries the file's absolute path, its
name in the file and the settings it was made with; ``status`` compares the
file with that, and ``down`` touches nothing that does not carry it, so a
domain of the same name made by hand is refused, never adopted or removed.

Python API::

    from bcvk import project
    proj = project.load("bcvk.toml")
    project.up(proj, ssh_wait=True)
    for vm in project.status(proj):
        print(vm.name, vm.sync, vm.differences)
    project.down(proj, remove=True)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bcvk import ephemeral, libvirt
from bcvk.errors import BcvkError, UsageError
from bcvk.log import logger
from bcvk.project.show import effective, to_toml
from bcvk.project.spec import FILE_NAME, KEYS, Kind, Project, Vm, find_file
from bcvk.project.spec import load as _load_path

__all__ = [
    "FILE_NAME", "Kind", "Project", "State", "Vm", "differences", "down", "effective", "load",
    "ssh", "status", "to_toml", "up",
]  # fmt: skip

IN_SYNC, DIFFERS, MISSING, FOREIGN = "in sync", "differs", "missing", "foreign"


def load(path: str | Path | None = None) -> Project:
    """PATH (default ./bcvk.toml), parsed and validated."""
    return _load_path(find_file(None if path is None else str(path)))


@dataclass(frozen=True)
class State:
    """One VM of the file against what exists."""

    vm: Vm
    state: str  # running, shut off, … as libvirt says; "missing" when absent
    sync: str  # IN_SYNC, DIFFERS, MISSING or FOREIGN
    differences: tuple[str, ...] = ()
    ssh_port: int | None = None

    @property
    def name(self) -> str:
        return self.vm.name

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name, "kind": self.vm.kind.value, "state": self.state,
            "sync": self.sync, "differences": list(self.differences), "ssh_port": self.ssh_port,
        }  # fmt: skip


def differences(recorded: dict[str, str], wanted: dict[str, str]) -> tuple[str, ...]:
    """``memory 2 GiB → 4 GiB`` for each setting the file changed (pure)."""
    order = {key: i for i, key in enumerate(KEYS)}
    keys = sorted(set(recorded) | set(wanted), key=lambda k: (order.get(k, len(order)), k))
    return tuple(
        f"{key} {recorded.get(key, '(default)')} → {wanted.get(key, '(default)')}"
        for key in keys
        if recorded.get(key) != wanted.get(key)
    )


def _compare(project: Project, vm: Vm, tag: str, state: str, port: int | None) -> State:
    try:
        made = json.loads(tag) if tag else {}
    except ValueError:
        made = {}
    if not isinstance(made, dict) or (made.get("file"), made.get("vm")) != (
        str(project.path),
        vm.name,
    ):
        return State(vm, state, FOREIGN, ssh_port=port)
    recorded = made.get("settings")
    diff = differences(recorded if isinstance(recorded, dict) else {}, vm.settings())
    return State(vm, state, DIFFERS if diff else IN_SYNC, diff, port)


def observe(project: Project, vm: Vm) -> State:
    """VM of PROJECT as it exists now."""
    if vm.kind is Kind.ephemeral:
        for info in ephemeral.ps():
            if info.name == vm.name:
                return _compare(project, vm, info.project, info.state, info.ssh_port)
        return State(vm, MISSING, MISSING)
    exists, found = libvirt.find(vm.name, uri=vm.uri)
    if not exists:
        return State(vm, MISSING, MISSING)
    if found is None or found.metadata.project is None:
        return State(vm, found.state if found else "unknown", FOREIGN)
    mark = found.metadata.project
    tag = json.dumps({"file": mark.file, "vm": mark.vm, "settings": _settings(mark.settings)})
    return _compare(project, vm, tag, found.state, found.metadata.ssh_port)


def _settings(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return {}


def status(project: Project, names: Sequence[str] = ()) -> list[State]:
    return [observe(project, vm) for vm in project.select(tuple(names))]


def _refusals(project: Project, states: list[State], recreate: bool) -> None:
    """Every reason `up` must not touch anything, before it touches anything."""
    problems: list[str] = []
    hint = ""
    for s in states:
        if s.sync == FOREIGN:
            what = "domain" if s.vm.kind is Kind.libvirt else "ephemeral VM"
            problems.append(f"vm.{s.name}: a {what} named {s.name!r} exists that was not "
                            f"created from {project.path}")  # fmt: skip
            hint = hint or (
                "rename the VM in the file, or remove that one yourself: bcvk "
                "never adopts or removes what it did not create from this file"
            )
        elif s.sync == DIFFERS and not recreate:
            problems.append(f"vm.{s.name} differs from the file: {', '.join(s.differences)}")
            hint = hint or (
                f"`bcvk up --recreate {s.name}` replaces it with a new VM (its "
                "disk is rebuilt and what was written to it is lost)"
            )
    if problems:
        raise BcvkError("; ".join(problems), hint=hint)


def _create(project: Project, vm: Vm) -> None:
    tag = project.tag(vm)
    if vm.ephemeral_options is not None:
        ephemeral.run_vm(dataclasses.replace(vm.ephemeral_options, detach=True, project=tag))
        return
    assert vm.libvirt_options is not None
    mark = libvirt.Project(str(project.path), vm.name, json.dumps(vm.settings(), sort_keys=True))
    lopts = dataclasses.replace(vm.libvirt_options, project=mark, start=True, ssh_wait=False)
    libvirt.run(str(vm.values["image"]), lopts, uri=vm.uri)


def _remove(vm: Vm) -> None:
    if vm.kind is Kind.ephemeral:
        ephemeral.rm(vm.name, force=True)
    else:
        libvirt.rm(vm.name, uri=vm.uri, force=True)


def up(project: Project, names: Sequence[str] = (), *, recreate: bool = False,
       ssh_wait: bool = False, timeout: float = 600.0) -> list[tuple[str, str]]:  # fmt: skip
    """Make what exists match PROJECT; returns (name, what was done) pairs.

    All or nothing: VMs this call created are removed again if a later one fails.
    """
    states = status(project, names)
    _refusals(project, states, recreate)
    done: list[tuple[str, str]] = []
    created: list[Vm] = []
    try:
        for s in states:
            if s.sync == MISSING:
                _create(project, s.vm)
                created.append(s.vm)
                done.append((s.name, "created"))
            elif s.sync == DIFFERS:
                logger.info("Recreating %s: %s", s.name, ", ".join(s.differences))
                _remove(s.vm)
                _create(project, s.vm)
                created.append(s.vm)
                done.append((s.name, "recreated"))
            elif s.vm.kind is Kind.libvirt and s.state != "running":
                libvirt.start(s.name, uri=s.vm.uri)
                done.append((s.name, "started"))
            else:
                done.append((s.name, "unchanged"))
        if ssh_wait:
            wait_for_ssh([s.vm for s in states], timeout)
    except (BcvkError, KeyboardInterrupt):
        for vm in reversed(created):
            logger.info("Removing %s, which this `up` created", vm.name)
            try:
                _remove(vm)
            except BcvkError as exc:
                logger.warning("could not remove %s: %s", vm.name, exc.message)
        raise
    return done


def wait_for_ssh(vms: Sequence[Vm], timeout: float) -> None:
    """Every libvirt VM answers a real SSH command, waited for side by side so
    each failure is reported, not only the first.  (A detached ephemeral VM
    is started only once its SSH answers.)"""
    waiting = [vm for vm in vms if vm.kind is Kind.libvirt]
    if not waiting:
        return
    with ThreadPoolExecutor(max_workers=len(waiting)) as pool:
        failures = [f for f in pool.map(lambda vm: _ssh_failure(vm, timeout), waiting) if f]
    if failures:
        raise BcvkError(
            "; ".join(failures),
            hint="see a VM's console: bcvk libvirt inspect NAME, or rerun bcvk up --ssh-wait",
        )


def _ssh_failure(vm: Vm, timeout: float) -> str | None:
    """Why VM does not answer SSH within TIMEOUT, or None once it does."""
    try:
        result = libvirt.ssh_command(vm.name, ["true"], uri=vm.uri, timeout=timeout)
    except BcvkError as exc:
        return f"VM {vm.name}: {exc.message}"
    if result.returncode == 0:
        return None
    return f"VM {vm.name} did not answer SSH: {result.stderr.strip() or result.returncode}"


def down(project: Project, names: Sequence[str] = (), *,
         remove: bool = False) -> list[tuple[str, str]]:  # fmt: skip
    """Stop (or with REMOVE, remove) the file's VMs; others are left alone."""
    done: list[tuple[str, str]] = []
    for s in status(project, names):
        if s.sync == MISSING:
            done.append((s.name, "missing"))
        elif s.sync == FOREIGN:
            logger.warning("left %s alone: it was not created from %s", s.name, project.path)
            done.append((s.name, "left alone"))
        elif remove or s.vm.kind is Kind.ephemeral:
            _remove(s.vm)  # an ephemeral VM has no stopped state
            done.append((s.name, "removed"))
        elif s.state == "running":
            libvirt.stop(s.name, uri=s.vm.uri)
            done.append((s.name, "stopped"))
        else:
            done.append((s.name, "already stopped"))
    return done


def ssh(project: Project, name: str, command: Sequence[str] = (), *,
        timeout: float = 240.0) -> int:  # fmt: skip
    """An SSH session (or COMMAND) in VM NAME of PROJECT, whichever kind it is."""
    (vm,) = project.select((name,))
    s = observe(project, vm)
    if s.sync in (MISSING, FOREIGN):
        what = "not up" if s.sync == MISSING else "not one bcvk created from this file"
        raise UsageError(
            f"VM {name} of {project.path.name} is {what}",
            hint=f"`bcvk up {name}` creates it" if s.sync == MISSING else "rename it in the file",
        )
    if vm.kind is Kind.ephemeral:
        return ephemeral.ssh_into(name, command, timeout=timeout)
    return libvirt.ssh_interactive(name, command, uri=vm.uri, timeout=timeout)
