"""What a bootc image declares for its installation: bootc's TOML drop-ins.

``/usr/lib/bootc/install/*.toml`` (the ``[install]`` table: root filesystem
type, …) and ``/usr/lib/bootc/kargs.d/*.toml`` (kernel arguments), read as
bootc reads them: in name order, later files overriding earlier ones, files
that do not parse skipped.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bcvk.errors import ImageContentError
from bcvk.image import tree


def _toml_dropins(root: Path, directory: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path in the image, table) of each parseable ``DIRECTORY/*.toml``, in name order.

    bootc skips what it cannot parse rather than failing the install; so do we.
    """
    found = tree.resolve(root, directory)
    if found is None or not found.is_dir():
        return
    for path in sorted(found.glob("*.toml")):
        try:
            yield f"{directory}/{path.name}", tomllib.loads(path.read_text(errors="replace"))
        except (tomllib.TOMLDecodeError, OSError):
            continue


def install_config(root: Path) -> dict[str, object]:
    """The merged ``/usr/lib/bootc/install/*.toml`` ``[install]`` table."""
    merged: dict[str, object] = {}
    for _, data in _toml_dropins(root, "/usr/lib/bootc/install"):
        install = data.get("install")
        if isinstance(install, dict):
            merged.update(install)
    return merged


def image_kargs(root: Path, arch: str) -> list[str]:
    """Kernel arguments the image ships in ``/usr/lib/bootc/kargs.d/*.toml``."""
    kargs: list[str] = []
    for name, data in _toml_dropins(root, "/usr/lib/bootc/kargs.d"):
        arches = data.get("match-architectures")
        if isinstance(arches, list) and arch not in arches:
            continue
        found = data.get("kargs", [])
        # A string would otherwise become one karg per character.
        if not isinstance(found, list) or not all(isinstance(k, str) for k in found):
            raise ImageContentError(
                f"{name} in the image: kargs must be a list of strings, not {found!r}",
                hint='bootc expects e.g. kargs = ["console=ttyS0"]; fix the image',
            )
        kargs += found
    return kargs


def install_filesystem(root: Path) -> str | None:
    """The root filesystem type the image asks for (``[install.filesystem.root] type``)."""
    filesystem = install_config(root).get("filesystem")
    if isinstance(filesystem, dict):
        root_cfg = filesystem.get("root")
        if isinstance(root_cfg, dict) and isinstance(root_cfg.get("type"), str):
            return str(root_cfg["type"])
    return None
