"""Builds in progress, recorded so that the next to-disk undoes a killed one.

SIGKILL skips every ``finally``: a killed build would leave its work
directory (gigabytes, beside OUTPUT) and its podman image mount behind.  So
each build keeps ``runtime_dir()/to-disk-<token>.json``: its process (pid,
start time, boot), its work directory, and the image it mounted.  Every
to-disk first reaps the records whose process is gone: it removes the work
directory (only when the owner file inside carries the record's token) and
drops the image mount, then the record.

The mount's state is written before each step (``mounting`` before
``podman image mount``, ``released`` once the unmount is under way), as the
ephemeral registry does, so no window leaves a mount nobody will drop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bcvk import paths
from bcvk.errors import BcvkError
from bcvk.host import podman
from bcvk.host.proc import Identity, dead_records, load_record
from bcvk.log import logger
from bcvk.to_disk import mkfs

OWNER = "owner"  # in the work directory: which run it belongs to


_PREFIX = "to-disk-"


def root() -> Path:
    return paths.runtime_dir()


@dataclass
class Run:
    token: str
    process: Identity
    work: str
    mount: str | None = None
    mount_state: str | None = None  # mounting → mounted → released

    @property
    def path(self) -> Path:
        return root() / f"{_PREFIX}{self.token}.json"

    @property
    def directory(self) -> Path:
        """The work directory."""
        return Path(self.work)

    def save(self) -> None:
        paths.write_atomic(self.path, json.dumps(dataclasses.asdict(self)))

    @classmethod
    def load(cls, path: Path) -> Run | None:
        return load_record(path, cls)

    @contextlib.contextmanager
    def mounted(self, image: str) -> Iterator[podman.ImageMount]:
        """``podman.image_mount(IMAGE)``, its state recorded before each step."""
        self.mount, self.mount_state = image, "mounting"
        self.save()
        with podman.image_mount(image, on_release=self._released) as mount:
            self.mount_state = "mounted"
            self.save()
            yield mount

    def _released(self) -> None:
        self.mount_state = "released"
        self.save()


@dataclass(frozen=True)
class Owner:
    """The owner file in a work directory: which run, on which host, made it."""

    token: str
    host: str
    process: Identity

    def write(self, work: Path) -> None:
        (work / OWNER).write_text(json.dumps(dataclasses.asdict(self)) + "\n")

    @classmethod
    def read(cls, work: Path) -> Owner | None:
        try:
            data = json.loads((work / OWNER).read_text())
            return cls(data["token"], data["host"], Identity(**data["process"]))
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def abandoned(self) -> bool:
        """Made on this host by a process that is gone (records do not survive a reboot)."""
        return self.host == platform.node() and not self.process.alive()


@contextlib.contextmanager
def recorded(work: Path) -> Iterator[Run]:
    """A record for the build working in WORK (made here), removed with WORK at the end."""
    reap()
    paths.ensure_private_dir(root())
    run = Run(secrets.token_hex(8), Identity.current(), os.fspath(work))
    run.save()  # before the directory exists: no moment leaves it unrecorded
    try:
        work.mkdir(mode=0o700)
        Owner(run.token, platform.node(), run.process).write(work)
        yield run
    finally:
        mkfs.remove_tree(work)
        with contextlib.suppress(FileNotFoundError):
            run.path.unlink()


def reap() -> list[str]:
    """Undo what killed builds of this host left; returns the work directories removed."""
    # A killed --installer bootc also leaves its installer VM, which is an
    # ephemeral VM with its own record: listing them reaps the dead ones.
    # (Imported here so that naming a disk option does not load that pipeline.)
    from bcvk import ephemeral

    ephemeral.ps()
    removed: list[str] = []
    if not root().is_dir():
        return removed
    for run in dead_records(root().glob(f"{_PREFIX}*.json"), Run.load):
        removed += _undo(run)
    return removed


def _undo(run: Run) -> list[str]:
    work = Path(run.work)
    removed = []
    owner = Owner.read(work)
    if owner is not None and owner.token == run.token:
        logger.info("Removing %s, left by an interrupted to-disk", work)
        mkfs.remove_tree(work)
        removed.append(run.work)
    if run.mount and run.mount_state in ("mounting", "mounted"):
        try:
            podman.unmount_image(run.mount)
        except BcvkError as exc:
            logger.warning("could not drop the image mount of an interrupted to-disk: %s", exc)
    return removed
