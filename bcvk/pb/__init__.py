"""``bcvk pb``: podman-bootc's commands on bcvk's libvirt layer, and their Python API.

A pb VM is an ordinary bcvk libvirt domain whose bcvk metadata carries one
more element, ``<bootc:podman-bootc id=… name=… image-id=… …/>``.  libvirt is
the single source of truth: ``list`` reads the domains, there is no side
registry that could drift.

Identity, as in podman-bootc: without ``--name`` there is one VM per image;
its ID is the first 12 hex digits of the image ID and its domain is
``podman-bootc-<ID>``.  ``--name NAME`` creates an additional VM whose
domain is NAME, with an ID of its own.  Every command takes an ID, a unique
ID prefix or a name.

Locking, as in podman-bootc: a ``run``/``ssh`` session holds a shared
``flock`` on ``<runtime dir>/pb/<ID>.lock`` for as long as it lasts;
``stop`` and ``rm`` need an exclusive one, so they refuse while a session is
open (even with ``-f``).  A lock dies with its process: a crashed bcvk never
blocks anything.

The package: ``model`` (pure: the metadata element, IDs, the VM view),
``session`` (locks and the shared SSH connection), ``domains`` (pb VMs in
libvirt), ``launch`` (``pb run``); the other verbs are here.

Python API::

    from bcvk import pb
    vm = pb.run("localhost/bcvk/debian-bootc:12")          # like `pb run -B`
    print(pb.ssh(vm.id, ["cat", "/etc/os-release"]).stdout)
    pb.stop(vm.id); pb.start(vm.id); pb.rm(vm.id, force=True)
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bcvk import run as proc
from bcvk.errors import BcvkError
from bcvk.host import ssh as sshlib
from bcvk.log import logger, step
from bcvk.pb.model import SSH_TIMEOUT, PbInfo, PbVm, latest, resolve
from bcvk.pb.session import (
    InUseError,
    VmLock,
    close_masters,
    in_use_error,
    mux_options,
    shared_connection,
    ssh_argv,
)
from bcvk.values import validate_user

if TYPE_CHECKING:
    from bcvk.libvirt.connection import Connection as Connection
    from bcvk.pb.launcher import Launched as Launched
    from bcvk.pb.launcher import RunOptions as RunOptions
    from bcvk.pb.launcher import launch as launch
    from bcvk.pb.launcher import make_run_options as make_run_options
    from bcvk.pb.launcher import run as run
    from bcvk.pb.launcher import run_session as run_session

# Imported on first use (PEP 562), like everything that talks to libvirt.
_LAUNCH = ("Launched", "RunOptions", "launch", "run", "run_session", "make_run_options")


def __getattr__(name: str) -> Any:
    if name not in _LAUNCH:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from bcvk.pb import launcher as module

    return getattr(module, name)


# `pb ssh` to a VM with a live shared connection runs ssh and nothing else:
# the libvirt layer (and the disk builder behind it) is imported only on the
# paths that talk to libvirt, inside the functions below.


def connect(uri: str | None) -> contextlib.AbstractContextManager[Connection]:
    """libvirt at URI, once what killed `pb run`s there left is undone."""
    from bcvk.libvirt.pending import connected

    return connected(uri)


def list_vms(uri: str | None = None) -> list[PbVm]:
    """Every pb VM at URI, oldest first, with whether a session holds it."""
    from bcvk.pb import domains

    with connect(uri) as conn:
        return domains.pb_vms(conn, with_use=True)


def inspect(ref: str, uri: str | None = None) -> PbVm:
    from bcvk.pb import domains

    with connect(uri) as conn:
        return resolve(domains.pb_vms(conn, with_use=True), ref)


def images() -> list[object]:
    """bootc images in podman's store (``pb images``)."""
    from bcvk.image import inspect as core

    return list(core.list_bootc())


# ------------------------------------------------------------------ ssh


def _running(conn: Connection, ref: str | None) -> PbVm:
    from bcvk.pb import domains

    vms = domains.pb_vms(conn)
    vm = resolve(vms, ref) if ref else latest(vms)
    if not vm.running:
        raise BcvkError(
            f"VM {vm.id} ({vm.name}) is not running (state: {vm.vm.state})",
            hint=f"start it with `bcvk pb start {vm.id}`",
        )
    return vm


def _fast_argv(
    ref: str | None, command: Sequence[str], user: str | None, uri: str | None, tty: bool | None
) -> tuple[str, list[str]] | None:
    """(ID, ssh argv) through a live shared connection, or None to ask libvirt."""
    if user is not None:
        validate_user(user)  # before anything connects: ssh would read '-o…' as an option
    found = shared_connection(ref, user, uri)
    if found is None:
        return None
    vm_id, port, login, path = found
    # The key is never read: the master holds the authenticated connection.
    target = sshlib.Target(port=port, key=Path(os.devnull), user=login)
    return vm_id, sshlib.argv(target, command, tty=tty, extra=mux_options(path))


def ssh_session(
    ref: str | None, command: Sequence[str] = (), *, user: str | None = None, uri: str | None = None
) -> int:
    """``pb ssh``: a session (or COMMAND) in a running VM, holding its session lock."""
    from bcvk.pb import launcher

    tty = True if not command and sys.stdin.isatty() else None
    fast = _fast_argv(ref, command, user, uri, tty)
    if fast is not None:
        vm_id, argv = fast
        with VmLock(vm_id) as lock:
            lock.shared()
            return int(proc.run(argv, check=False, capture=False, stdout=1, stdin=0).returncode)
    with connect(uri) as conn:
        vm = _running(conn, ref)
    with VmLock(vm.id) as lock:
        lock.shared()
        return launcher.session(vm, command, user=user)


def ssh(
    ref: str | None,
    command: Sequence[str],
    *,
    user: str | None = None,
    uri: str | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run COMMAND in VM REF and capture its output (never raises on its exit status)."""
    fast = _fast_argv(ref, command, user, uri, False)
    if fast is not None:
        vm_id, argv = fast
    else:
        with connect(uri) as conn:
            vm = _running(conn, ref)
        vm_id = vm.id
        argv = ssh_argv(vm, command, user=user, tty=False, share=True)
    with VmLock(vm_id) as lock:
        lock.shared()
        return proc.run(argv, check=False, timeout=timeout)


# ------------------------------------------------------------------ start / stop / rm


def start(
    ref: str,
    *,
    uri: str | None = None,
    wait: bool = True,
    quiet: bool = True,
    timeout: float = SSH_TIMEOUT,
) -> PbVm:
    from bcvk.pb import domains

    with connect(uri) as conn:
        vm = resolve(domains.pb_vms(conn), ref)
        if vm.running:
            logger.info("VM %s is already running", vm.id)
            return vm
        if not wait:
            close_masters(vm.id)
            conn.get(vm.name).start()
            return domains.get(conn, vm.id)
        return domains.boot(conn, vm, quiet=quiet, timeout=timeout)


def stop(ref: str, *, uri: str | None = None) -> PbVm:
    """Shut the VM down; its domain and disk stay (unlike podman-bootc)."""
    from bcvk.pb import domains

    with connect(uri) as conn:
        vm = resolve(domains.pb_vms(conn), ref)
        with VmLock(vm.id) as lock:
            if not lock.try_exclusive():
                raise in_use_error(vm.id, vm.name, "stop")
            domains.stop(conn, vm)
        return domains.get(conn, vm.id)


def rm(ref: str, *, force: bool = False, uri: str | None = None) -> PbVm:
    """Remove VM REF; a running one only with FORCE; never one with an open session."""
    from bcvk.pb import domains

    with connect(uri) as conn:
        vm = resolve(domains.pb_vms(conn), ref)
        with VmLock(vm.id) as lock:
            if not lock.try_exclusive():
                raise in_use_error(vm.id, vm.name, "remove")
            if vm.running and not force:
                raise BcvkError(
                    f"VM {vm.id} ({vm.name}) is running",
                    hint=f"stop it first (`bcvk pb stop {vm.id}`) or pass -f to stop it",
                )
            with step(f"Removing VM {vm.id} ({vm.name})"):
                domains.remove(conn, vm)
        return vm


def rm_all(*, force: bool = False, uri: str | None = None) -> tuple[list[PbVm], list[PbVm]]:
    """Remove every pb VM that is stopped (running ones too with FORCE), skipping those in use.

    Returns (removed, skipped).
    """
    from bcvk.libvirt.connection import DomainNotFound
    from bcvk.pb import domains

    removed: list[PbVm] = []
    skipped: list[PbVm] = []
    with connect(uri) as conn:
        for vm in domains.pb_vms(conn):
            with VmLock(vm.id) as lock:
                if not lock.try_exclusive():
                    logger.warning("Skipping VM %s (%s): an SSH session is open", vm.id, vm.name)
                    skipped.append(vm)
                    continue
                if vm.running and not force:
                    logger.warning("Skipping running VM %s (%s); -f removes it", vm.id, vm.name)
                    skipped.append(vm)
                    continue
                try:
                    domains.remove(conn, vm)
                except DomainNotFound:
                    continue
                logger.info("Removed VM %s (%s)", vm.id, vm.name)
                removed.append(vm)
    return removed, skipped


__all__ = [
    "InUseError",
    "Launched",
    "PbInfo",
    "PbVm",
    "RunOptions",
    "images",
    "inspect",
    "launch",
    "list_vms",
    "rm",
    "rm_all",
    "run",
    "run_session",
    "ssh",
    "ssh_session",
    "start",
    "stop",
    "make_run_options",
]
