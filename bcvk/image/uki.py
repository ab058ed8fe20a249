"""Unified kernel images (UKIs): the kernel and initramfs inside one PE/COFF file.

bcvk boots a UKI's kernel directly, so it cuts the ``.linux`` and ``.initrd``
sections out of the file (as ``objcopy --dump-section`` would) with no tool.
"""

from __future__ import annotations

import struct
from pathlib import Path

from bcvk.errors import BcvkError, ImageContentError


def pe_sections(data: bytes) -> dict[str, bytes]:
    """Sections of a PE/COFF file (a UKI) by name, each cut to its real size."""
    if data[:2] != b"MZ" or len(data) < 0x40:
        raise ValueError("not a PE file (no MZ header)")
    (pe_offset,) = struct.unpack_from("<I", data, 0x3C)
    if data[pe_offset : pe_offset + 4] != b"PE\0\0":
        raise ValueError("not a PE file (no PE signature)")
    coff = pe_offset + 4
    (count,) = struct.unpack_from("<H", data, coff + 2)
    (optional_size,) = struct.unpack_from("<H", data, coff + 16)
    table = coff + 20 + optional_size
    sections: dict[str, bytes] = {}
    for i in range(count):
        header = table + 40 * i
        raw_name, virtual_size, _, raw_size, raw_offset = struct.unpack_from(
            "<8sIIII", data, header
        )
        name = raw_name.rstrip(b"\0").decode("ascii", errors="replace")
        size = min(virtual_size, raw_size) if virtual_size else raw_size
        sections[name] = data[raw_offset : raw_offset + size]
    return sections


def extract_uki(uki: Path, kernel_out: Path, initrd_out: Path) -> bool:
    """Write a UKI's .linux and .initrd; returns whether it had an initrd."""
    try:
        sections = pe_sections(uki.read_bytes())
    except (ValueError, struct.error) as exc:
        raise ImageContentError(
            f"{uki} is not a valid unified kernel image: {exc}",
            hint="rebuild the UKI (ukify) or ship vmlinuz + initramfs.img instead",
        ) from None
    if ".linux" not in sections:
        raise BcvkError(
            f"{uki} has no .linux section; it is not a unified kernel image",
            hint="rebuild the UKI (ukify) or ship vmlinuz + initramfs.img instead",
        )
    kernel_out.write_bytes(sections[".linux"])
    if ".initrd" in sections:
        initrd_out.write_bytes(sections[".initrd"])
        return True
    return False
