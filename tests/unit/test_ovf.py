"""OVF descriptors and manifests."""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

from bcvk.to_disk import ovf

SPEC = ovf.OvfSpec(
    name="out",
    disk_file="out-disk1.vmdk",
    disk_file_size=123456,
    disk_capacity=4 * 1024**3,
    os_description="Debian GNU/Linux 12 (bookworm)",
)


def test_descriptor_golden(golden: Callable[[str, str], None]) -> None:
    golden("to-disk/descriptor.ovf", ovf.descriptor(SPEC))


def test_descriptor_parses_back() -> None:
    facts = ovf.parse(ovf.descriptor(SPEC))
    assert facts == {
        "name": "out",
        "disk_file": "out-disk1.vmdk",
        "disk_file_size": 123456,
        "disk_capacity": 4 * 1024**3,
        "disk_format": ovf.VMDK_STREAM,
        "cpus": 2,
        "memory_mib": 4096,
        "firmware": "efi",
    }


def test_rasd_fields_are_in_schema_order() -> None:
    root = ET.fromstring(ovf.descriptor(SPEC))
    for item in root.iter(f"{{{ovf.OVF}}}Item"):
        names = [child.tag.split("}")[1] for child in item]
        assert names == sorted(names)


def test_bios_firmware() -> None:
    text = ovf.descriptor(
        ovf.OvfSpec(
            name="x", disk_file="x.vmdk", disk_file_size=1, disk_capacity=1, firmware="bios"
        )
    )
    assert ovf.parse(text)["firmware"] == "bios"


def test_manifest(tmp_path: Path) -> None:
    disk = tmp_path / "d.vmdk"
    disk.write_bytes(b"disk")
    text = ovf.manifest([("a.ovf", b"ovf"), ("d.vmdk", disk)])
    assert text == (
        f"SHA256(a.ovf)= {hashlib.sha256(b'ovf').hexdigest()}\n"
        f"SHA256(d.vmdk)= {hashlib.sha256(b'disk').hexdigest()}\n"
    )
