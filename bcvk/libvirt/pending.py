"""VM creations in progress, journalled so that the next command undoes a killed one.

``libvirt run``/``create`` and ``pb run`` make a key pair, a disk volume, a
seed ISO and a domain one after another, and undo them when a step fails.
SIGKILL skips that undo.  So each step is written to a journal *before* it
is taken — ``data_dir()/libvirt/pending-<token>.json``, naming the process
(``host.proc.Identity``) and the URI — and the journal is deleted once the
VM is complete.

Every libvirt and pb command that connects first undoes, for its own URI,
the journals whose process is gone, and only what still matches them: the
key directory of the journalled UUID, a journalled volume no other domain
uses, the domain with the journalled UUID (a UUID bcvk generated for it).

``transaction`` is the live side: the ``Undo`` steps a failing run takes
itself, in reverse, with each resource journalled before it is made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bcvk import paths, to_disk
from bcvk.host.proc import Identity, dead_records, load_record
from bcvk.libvirt.connection import Connection, DomainNotFound, LibvirtError, connect
from bcvk.libvirt.vms import key_dir
from bcvk.libvirt.xml import Domain
from bcvk.log import logger

_PREFIX = "pending-"


def root() -> Path:
    return paths.data_dir() / "libvirt"


@dataclass
class Journal:
    uri: str
    token: str = field(default_factory=lambda: secrets.token_hex(8))
    process: Identity = field(default_factory=Identity.current)
    # ("key", uuid) | ("volume", pool, name) | ("domain", uuid), in the order taken
    steps: list[list[str]] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return root() / f"{_PREFIX}{self.token}.json"

    def note(self, *step: str) -> None:
        """Record STEP before it is taken."""
        self.steps.append(list(step))
        paths.ensure_private_dir(paths.ensure_private_dir(paths.data_dir()))
        paths.ensure_private_dir(root())
        paths.write_atomic(self.path, json.dumps(dataclasses.asdict(self)))

    def close(self) -> None:
        """The creation is complete, or undone: nothing is left to journal."""
        self.path.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> Journal | None:
        return load_record(path, cls)


@contextlib.contextmanager
def connected(uri: str | None) -> Iterator[Connection]:
    """A connection to URI, after undoing what killed creations there left.

    A creation killed while building its base disk left a to-disk run: that
    is undone first (locally; a remote host's builds ran here too).
    """
    to_disk.reap_interrupted()
    with connect(uri) as conn:
        sweep(conn)
        yield conn


def sweep(conn: Connection) -> list[str]:
    """Undo the creations of dead processes at CONN's URI; what was removed, as text."""
    done: list[str] = []
    if not root().is_dir():
        return done
    found = root().glob(f"{_PREFIX}*.json")
    for journal in dead_records(found, Journal.load, lambda j: j.uri == conn.uri):
        logger.info("Undoing a VM creation that was interrupted (journal %s)", journal.token)
        done += _undo(conn, journal)
    return done


def _undo(conn: Connection, journal: Journal) -> list[str]:
    done: list[str] = []
    uuids = {step[1] for step in journal.steps if step[0] == "domain"}
    for step in reversed(journal.steps):
        kind, *args = step
        try:
            if kind == "domain":
                done += _remove_domain(conn, args[0])
            elif kind == "volume":
                done += _remove_volume(conn, args[0], args[1], uuids)
            elif kind == "key":
                directory = key_dir(args[0])
                if directory.is_dir():
                    shutil.rmtree(directory, ignore_errors=True)
                    done.append(f"key {directory}")
        except (LibvirtError, DomainNotFound, OSError, IndexError) as exc:
            logger.warning("while undoing an interrupted creation, %s failed: %s", kind, exc)
    return done


def _remove_domain(conn: Connection, uuid: str) -> list[str]:
    for dom in conn.domains():
        if dom.uuid == uuid:
            with contextlib.suppress(DomainNotFound):
                if dom.is_active():
                    dom.destroy()
                if dom.is_persistent():
                    dom.undefine()
            return [f"domain {dom.name}"]
    return []


def _remove_volume(conn: Connection, pool_name: str, name: str, ours: set[str]) -> list[str]:
    pool = conn.pool(pool_name)
    volume = pool.volume(name) if pool is not None else None
    if volume is None:
        return []
    # The name was only journalled: if another domain now uses a volume of
    # that name, it is that domain's.
    for dom in conn.domains():
        with contextlib.suppress(DomainNotFound):
            if dom.uuid in ours:
                continue
            if volume.path in (d.source for d in Domain.from_xml(dom.xml(inactive=True)).disks):
                return []
    volume.delete()
    return [f"volume {pool_name}/{name}"]


class Undo:
    """Undo steps for a half-done run, executed in reverse unless committed.

    Each resource is also noted in a journal (``pending``) before it is made,
    so that a run killed with SIGKILL is undone by the next command.
    """

    def __init__(self, journal: Journal) -> None:
        self.steps: list[tuple[str, Callable[[], None]]] = []
        self.journal = journal

    def note(self, *step: str) -> None:
        """About to make the resource STEP names (see ``Journal``)."""
        self.journal.note(*step)

    def push(self, what: str, fn: Callable[[], None]) -> None:
        self.steps.append((what, fn))

    def rollback(self) -> None:
        for what, fn in reversed(self.steps):
            try:
                fn()
            except Exception as exc:  # keep undoing the rest
                logger.warning("while cleaning up, %s failed: %s", what, exc)
        self.steps.clear()


@contextlib.contextmanager
def transaction(conn: Connection) -> Iterator[Undo]:
    """A VM's creation: all of it, or (on an error, a signal, or SIGKILL) none of it."""
    sweep(conn)
    undo = Undo(Journal(conn.uri))
    try:
        yield undo
    except BaseException:
        if undo.steps:
            logger.info("Removing what this run created…")
        undo.rollback()
        undo.journal.close()
        raise
    undo.journal.close()
