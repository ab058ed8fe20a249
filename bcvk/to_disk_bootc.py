"""`bcvk to-disk --installer bootc`: the image installs itself from a VM.

This path boots an ephemeral VM of the image, attaches OUTPUT as a virtio
disk with serial ``output`` and runs ``bootc install to-disk`` inside.  It
needs bcvk's ephemeral VM layer (``bcvk.ephemeral``).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from bcvk.errors import BcvkError

if TYPE_CHECKING:
    from bcvk.to_disk import DiskFormat, Options, Result


def available() -> bool:
    """Whether the ephemeral VM layer this installer runs on exists yet."""
    return importlib.util.find_spec("bcvk.ephemeral") is not None


def unavailable(image: str) -> NoReturn:
    raise BcvkError(
        f"the bootc installer (a VM of {image} running `bootc install to-disk`) is not "
        "available yet in this bcvk: it needs the ephemeral VM layer",
        hint="use --installer native (no VM, no root), which builds a plain root filesystem",
    )


def build(
    image: str,
    output: Path,
    opts: Options,
    fmt: DiskFormat,
    disk_size: int,
    cache_hash: str,
    digest: str,
    start: float = 0.0,
) -> Result:
    del output, opts, fmt, disk_size, cache_hash, digest
    _ = time.monotonic() - start
    unavailable(image)
