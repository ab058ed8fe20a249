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


# QEMU's firmware descriptors (docs/interop/firmware.json): a file in a later
# directory replaces the one of the same name in an earlier; they apply in
# the order of their names.
DESCRIPTOR_DIRS = (Path("/usr/share/qemu/firmware"), Path("/etc/qemu/firmware"))


@dataclass(frozen=True)
class Descriptor:
    """One QEMU firmware descriptor, as far as bcvk reads it."""

    file: str
    description: str
    interfaces: tuple[str, ...]
    architectures: tuple[str, ...]
    executable: str | None
    nvram_template: str | None
    format: str | None
    features: tuple[str, ...]

    @property
    def secure_boot(self) -> bool:
        return "secure-boot" in self.features

    def to_json(self) -> dict[str, object]:
        return {
            "file": self.file,
            "description": self.description,
            "interface_types": list(self.interfaces),
            "architectures": list(self.architectures),
            "executable": self.executable,
            "nvram_template": self.nvram_template,
            "format": self.format,
            "secure_boot": self.secure_boot,
            "enrolled_keys": "enrolled-keys" in self.features,
            "features": list(self.features),
        }


def parse_descriptor(file: str, data: object) -> Descriptor | None:
    """DATA (a descriptor's parsed JSON), or None when it is not one bcvk can read."""
    if not isinstance(data, dict):
        return None
    mapping = data.get("mapping")
    mapping = mapping if isinstance(mapping, dict) else {}

    def file_of(key: str) -> tuple[str | None, str | None]:
        part = mapping.get(key)
        if not isinstance(part, dict) or not isinstance(part.get("filename"), str):
            return None, None
        fmt = part.get("format")
        return part["filename"], fmt if isinstance(fmt, str) else None

    def strings(value: object) -> tuple[str, ...]:
        return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()

    executable, fmt = file_of("executable")
    if executable is None:
        executable, fmt = file_of("kernel")  # device "kernel" / "memory" firmware
    targets = data.get("targets")
    arches = tuple(
        t["architecture"]
        for t in (targets if isinstance(targets, list) else [])
        if isinstance(t, dict) and isinstance(t.get("architecture"), str)
    )
    description = data.get("description")
    return Descriptor(
        file=file,
        description=description if isinstance(description, str) else "",
        interfaces=strings(data.get("interface-types")),
        architectures=arches,
        executable=executable,
        nvram_template=file_of("nvram-template")[0],
        format=fmt,
        features=strings(data.get("features")),
    )


def descriptors(dirs: tuple[Path, ...] = DESCRIPTOR_DIRS) -> list[Descriptor]:
    """The host's firmware descriptors in QEMU's order (unreadable files skipped)."""
    import json

    by_name: dict[str, Path] = {}
    for directory in dirs:
        try:
            for path in directory.iterdir():
                if path.suffix == ".json":
                    by_name[path.name] = path
        except OSError:
            continue
    found = []
    for name in sorted(by_name):
        try:
            data = json.loads(by_name[name].read_text())
        except (OSError, ValueError):
            continue
        parsed = parse_descriptor(str(by_name[name]), data)
        if parsed is not None:
            found.append(parsed)
    return found
