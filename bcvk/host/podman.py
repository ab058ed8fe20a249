"""Typed wrappers around podman: the image store, pulls and read-only mounts.

Podman is used for what it is best at — storing, inspecting and mounting
images — and never to run QEMU.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bcvk import run
from bcvk.errors import BcvkError, CommandError, NotFoundError, UsageError

BOOTC_LABEL = "containers.bootc"

# An image reference: [registry/]path[:tag][@digest].  Deliberately permissive
# about characters podman accepts, strict about shell metacharacters.
_REF_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._/:@+-]*")


def validate_reference(ref: str) -> str:
    if not ref or not _REF_RE.fullmatch(ref) or len(ref) > 512:
        raise UsageError(
            f"invalid image reference {ref!r}",
            hint="use a name such as localhost/my-image:tag or quay.io/fedora/fedora-bootc:42",
        )
    return ref


def split_reference(name: str) -> tuple[str, str]:
    """``registry/repo:tag`` → (``registry/repo``, ``tag``); digests keep ``@…``."""
    if "@" in name:
        repo, digest = name.split("@", 1)
        return repo, "@" + digest
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :]
    return name, "latest"


@dataclass(frozen=True)
class ImageInfo:
    id: str
    digest: str
    names: tuple[str, ...]
    created: str
    size: int
    architecture: str
    os: str
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def is_bootc(self) -> bool:
        return self.labels.get(BOOTC_LABEL) == "1"

    @property
    def short_id(self) -> str:
        return self.id[:12]


def parse_inspect(data: dict[str, Any]) -> ImageInfo:
    labels = data.get("Labels") or (data.get("Config") or {}).get("Labels") or {}
    return ImageInfo(
        id=str(data.get("Id", "")),
        digest=str(data.get("Digest", "")),
        names=tuple(data.get("RepoTags") or data.get("Names") or ()),
        created=str(data.get("Created", "")),
        size=int(data.get("Size", 0)),
        architecture=str(data.get("Architecture", "")),
        os=str(data.get("Os", "")),
        labels={str(k): str(v) for k, v in labels.items()},
    )


def podman() -> str:
    return os.fspath(run.require("podman", why="to read container images"))


def inspect_image(ref: str) -> ImageInfo | None:
    """Inspect a local image; ``None`` when it is not in the store."""
    validate_reference(ref)
    result = run.run([podman(), "image", "inspect", "--format", "json", ref], check=False)
    if result.returncode != 0:
        if "image not known" in result.stderr or "no such image" in result.stderr.lower():
            return None
        raise CommandError(result.args, result.returncode, result.stderr)
    entries = json.loads(result.stdout or "[]")
    return parse_inspect(entries[0]) if entries else None


def pull(ref: str, *, tls_verify: bool = True) -> None:
    argv = [podman(), "pull"]
    if not tls_verify:
        argv.append("--tls-verify=false")
    run.run([*argv, ref], capture=False)


def ensure_image(ref: str, pull_policy: str = "missing", *, tls_verify: bool = True) -> ImageInfo:
    """Return the local image, pulling it according to ``pull_policy``."""
    info = None if pull_policy == "always" else inspect_image(ref)
    if info is None and pull_policy != "never":
        try:
            pull(ref, tls_verify=tls_verify)
        except CommandError as exc:
            raise NotFoundError(
                f"image {ref} is not in local storage and could not be pulled",
                hint="check the name, or build it first (podman build / make images)",
            ) from exc
        info = inspect_image(ref)
    if info is None:
        raise NotFoundError(
            f"image {ref} is not in local storage",
            hint="pull it with `podman pull` or allow pulling with --pull missing",
        )
    return info


def local_image(ref: str, *, bootc: bool = False) -> ImageInfo:
    """REF from local storage (never pulled); with BOOTC, refuse an image without the label."""
    info = inspect_image(ref)
    if info is None:
        raise NotFoundError(
            f"image {ref} is not in local storage",
            hint="list bootc images with `bcvk images list`, or `podman pull` it first",
        )
    if bootc and not info.is_bootc:
        raise BcvkError(
            f"image {ref} is not a bootc image: it has no {BOOTC_LABEL}=1 label",
            hint="build it FROM a bootc base image, or add LABEL containers.bootc=1",
        )
    return info


def list_images(label: str | None = f"{BOOTC_LABEL}=1") -> list[dict[str, Any]]:
    argv = [podman(), "images", "--format", "json"]
    if label:
        argv += ["--filter", f"label={label}"]
    entries: list[dict[str, Any]] = json.loads(run.output(argv) or "[]")
    return entries


def rootless() -> bool:
    return os.geteuid() != 0


def unshare_argv(argv: Sequence[str]) -> list[str]:
    """Wrap ARGV so that it runs in podman's user namespace when rootless.

    A rootless image mount only exists inside that namespace, so whatever reads
    the mounted tree must run there too.
    """
    if not rootless():
        return list(argv)
    return [podman(), "unshare", *argv]


def mount_image(ref: str) -> Path:
    out = run.output(unshare_argv([podman(), "image", "mount", ref]))
    if not out:
        raise BcvkError(
            f"podman image mount {ref} returned no path",
            hint="check podman's storage with `podman info`",
        )
    return Path(out.splitlines()[-1])


def unmount_image(ref: str) -> None:
    # Other users of the same image hold their own mount count; unmount
    # only drops ours.
    run.run(unshare_argv([podman(), "image", "unmount", ref]), check=False)


class ImageMount:
    """An image mount whose unmount can start early, in the background.

    ``podman image unmount`` costs ~0.2 s; a caller done reading the tree
    calls ``release()`` and the unmount overlaps its remaining work (to-disk
    converting the disk). Leaving the block always waits for the unmount.
    """

    def __init__(self, ref: str, path: Path, on_release: Callable[[], None] | None = None) -> None:
        self.ref = ref
        self.path = path
        self._unmounting: run.Process | None = None
        self._on_release = on_release

    def release(self) -> None:
        if self._unmounting is None:
            # Not tied to bcvk's life: the unmount must finish even if bcvk dies.
            self._unmounting = run.spawn(
                unshare_argv([podman(), "image", "unmount", self.ref]),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                die_with_parent=False,
            )
            if self._on_release is not None:
                self._on_release()

    def close(self) -> None:
        if self._unmounting is None:
            unmount_image(self.ref)
            if self._on_release is not None:
                self._on_release()
        else:
            self._unmounting.wait()


@contextlib.contextmanager
def image_mount(ref: str, on_release: Callable[[], None] | None = None) -> Iterator[ImageMount]:
    """Like ``mounted``, with ``release()`` to unmount before the block ends.

    ON_RELEASE runs once the unmount is done or under way (for records that
    must not drop the mount a second time).
    """
    mount: ImageMount | None = None
    try:
        # A signal while `podman image mount` runs would kill it after it may
        # have mounted, leaving a mount nobody owns: it waits until we hold it.
        with run.signals_deferred():
            mount = ImageMount(ref, mount_image(ref), on_release)
        yield mount
    finally:
        if mount is not None:
            mount.close()


@contextlib.contextmanager
def mounted(ref: str) -> Iterator[Path]:
    """Mount an image read-only for the duration of the block.

    The path is only readable by this process when running as root; rootless
    callers must read it through ``unshare_argv``.
    """
    with image_mount(ref) as mount:
        yield mount.path


def mounted_images() -> list[str]:
    """IDs of images podman currently has mounted (for leak checks)."""
    out = run.output(unshare_argv([podman(), "image", "mount", "--format", "json"]), check=False)
    try:
        entries = json.loads(out or "[]")
    except json.JSONDecodeError:
        return []
    return [str(e.get("id", "")) for e in entries]


def graph_root() -> Path:
    """Where podman keeps this user's images (root's or the rootless user's store)."""
    return Path(run.output([podman(), "info", "--format", "{{.Store.GraphRoot}}"]))
