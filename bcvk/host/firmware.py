"""Find UEFI firmware (OVMF) images on the host."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# (code, vars) pairs without secure boot, most specific first; Debian, then
# Fedora/RHEL, then Arch/openSUSE layouts.
_OVMF_PAIRS = (
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
    ("/usr/share/edk2/x64/OVMF_CODE.4m.fd", "/usr/share/edk2/x64/OVMF_VARS.4m.fd"),
    ("/usr/share/qemu/ovmf-x86_64-code.bin", "/usr/share/qemu/ovmf-x86_64-vars.bin"),
)


@dataclass(frozen=True)
class Ovmf:
    code: Path
    vars: Path


def find_ovmf() -> Ovmf | None:
    for code, vars_ in _OVMF_PAIRS:
        if Path(code).is_file() and Path(vars_).is_file():
            return Ovmf(Path(code), Path(vars_))
    return None
