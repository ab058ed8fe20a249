"""OVF 1.0 descriptors for ``.ova`` disks (pure).

An OVA is a tar whose first member is the descriptor, followed by the
streamOptimized VMDK it references (and optionally a manifest of SHA-256
sums).  The descriptor says what VMware- and VirtualBox-style importers need:
CPUs, memory, firmware, one SATA disk and one NAT network adapter.
"""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

OVF = "http://schemas.dmtf.org/ovf/envelope/1"
RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
VMW = "http://www.vmware.com/schema/ovf"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
VMDK_STREAM = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"

# CIM resource types (DSP1041)
CPU, MEMORY, ETHERNET, DISK, SATA = 3, 4, 10, 17, 20
OS_OTHER_LINUX_64 = 101  # CIM_OperatingSystem: "Linux 2.6.x 64-Bit"/other 64-bit Linux


@dataclass(frozen=True)
class OvfSpec:
    name: str
    disk_file: str  # member name of the VMDK inside the OVA
    disk_file_size: int  # bytes of the VMDK file
    disk_capacity: int  # virtual size in bytes
    cpus: int = 2
    memory_mib: int = 4096
    firmware: str = "uefi"  # "uefi" or "bios"
    os_description: str = "Linux"


def _q(ns: str, tag: str) -> str:
    return f"{{{ns}}}{tag}"


def _sub(
    parent: ET.Element, ns: str, tag: str, text: str | None = None, **attrs: str
) -> ET.Element:
    element = ET.SubElement(parent, _q(ns, tag), {_attr(k): v for k, v in attrs.items()})
    if text is not None:
        element.text = text
    return element


def _attr(key: str) -> str:
    prefix, _, name = key.partition("_")
    return {"ovf": _q(OVF, name), "vmw": _q(VMW, name)}[prefix] if name else key


def _item(section: ET.Element, fields: Sequence[tuple[str, str]]) -> None:
    item = _sub(section, OVF, "Item")
    # CIM requires the rasd properties in alphabetical order.
    for name, value in sorted(fields):
        _sub(item, RASD, name, value)


def descriptor(spec: OvfSpec) -> str:
    for prefix, ns in (("ovf", OVF), ("rasd", RASD), ("vssd", VSSD), ("vmw", VMW), ("xsi", XSI)):
        ET.register_namespace(prefix, ns)
    env = ET.Element(_q(OVF, "Envelope"), {_q(OVF, "version"): "1.0"})
    refs = _sub(env, OVF, "References")
    _sub(
        refs,
        OVF,
        "File",
        ovf_href=spec.disk_file,
        ovf_id="file1",
        ovf_size=str(spec.disk_file_size),
    )

    disks = _sub(env, OVF, "DiskSection")
    _sub(disks, OVF, "Info", "Virtual disk information")
    _sub(
        disks,
        OVF,
        "Disk",
        ovf_capacity=str(spec.disk_capacity),
        ovf_capacityAllocationUnits="byte",
        ovf_diskId="vmdisk1",
        ovf_fileRef="file1",
        ovf_format=VMDK_STREAM,
    )
    nets = _sub(env, OVF, "NetworkSection")
    _sub(nets, OVF, "Info", "The list of logical networks")
    net = _sub(nets, OVF, "Network", ovf_name="NAT")
    _sub(net, OVF, "Description", "The NAT network")

    system = _sub(env, OVF, "VirtualSystem", ovf_id=spec.name)
    _sub(system, OVF, "Info", "A virtual machine made from a bootc container image by bcvk")
    _sub(system, OVF, "Name", spec.name)
    os_section = _sub(
        system, OVF, "OperatingSystemSection", ovf_id=str(OS_OTHER_LINUX_64),
        vmw_osType="other5xLinux64Guest",
    )  # fmt: skip
    _sub(os_section, OVF, "Info", "The operating system installed")
    _sub(os_section, OVF, "Description", spec.os_description)

    hw = _sub(system, OVF, "VirtualHardwareSection")
    _sub(hw, OVF, "Info", "Virtual hardware requirements")
    vsys = _sub(hw, OVF, "System")
    _sub(vsys, VSSD, "ElementName", "Virtual Hardware Family")
    _sub(vsys, VSSD, "InstanceID", "0")
    _sub(vsys, VSSD, "VirtualSystemIdentifier", spec.name)
    _sub(vsys, VSSD, "VirtualSystemType", "vmx-14")
    _item(hw, [
        ("AllocationUnits", "hertz * 10^6"),
        ("Description", "Number of virtual CPUs"),
        ("ElementName", f"{spec.cpus} virtual CPU(s)"),
        ("InstanceID", "1"),
        ("ResourceType", str(CPU)),
        ("VirtualQuantity", str(spec.cpus)),
    ])  # fmt: skip
    _item(hw, [
        ("AllocationUnits", "byte * 2^20"),
        ("Description", "Memory size"),
        ("ElementName", f"{spec.memory_mib}MB of memory"),
        ("InstanceID", "2"),
        ("ResourceType", str(MEMORY)),
        ("VirtualQuantity", str(spec.memory_mib)),
    ])  # fmt: skip
    _item(hw, [
        ("Address", "0"),
        ("Description", "SATA controller"),
        ("ElementName", "sataController0"),
        ("InstanceID", "3"),
        ("ResourceSubType", "AHCI"),
        ("ResourceType", str(SATA)),
    ])  # fmt: skip
    _item(hw, [
        ("AddressOnParent", "0"),
        ("ElementName", "disk0"),
        ("HostResource", "ovf:/disk/vmdisk1"),
        ("InstanceID", "4"),
        ("Parent", "3"),
        ("ResourceType", str(DISK)),
    ])  # fmt: skip
    _item(hw, [
        ("AutomaticAllocation", "true"),
        ("Connection", "NAT"),
        ("ElementName", "ethernet0"),
        ("InstanceID", "5"),
        ("ResourceSubType", "E1000"),
        ("ResourceType", str(ETHERNET)),
    ])  # fmt: skip
    _sub(
        hw, VMW, "Config", ovf_required="false", vmw_key="firmware",
        vmw_value="efi" if spec.firmware == "uefi" else "bios",
    )  # fmt: skip
    ET.indent(env, "  ")
    body = ET.tostring(env, encoding="unicode")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + body + "\n"


def manifest(files: Sequence[tuple[str, bytes | Path]]) -> str:
    """``SHA256(name)= hex`` lines (the OVF manifest format)."""
    lines = []
    for name, content in files:
        digest = hashlib.sha256()
        if isinstance(content, Path):
            with open(content, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        else:
            digest.update(content)
        lines.append(f"SHA256({name})= {digest.hexdigest()}")
    return "\n".join(lines) + "\n"


def parse(text: str) -> dict[str, object]:
    """The facts of a descriptor (for tests and `inspect`-style checks)."""
    root = ET.fromstring(text)
    ns = {"ovf": OVF, "rasd": RASD, "vmw": VMW}
    disk = root.find("ovf:DiskSection/ovf:Disk", ns)
    file_ = root.find("ovf:References/ovf:File", ns)
    items: dict[int, dict[str, str]] = {}
    for item in root.iterfind(".//ovf:VirtualHardwareSection/ovf:Item", ns):
        fields = {child.tag.split("}")[1]: child.text or "" for child in item}
        items[int(fields["ResourceType"])] = fields
    config = root.find(".//ovf:VirtualHardwareSection/vmw:Config", ns)
    name = root.find("ovf:VirtualSystem/ovf:Name", ns)
    assert disk is not None
    assert file_ is not None
    return {
        "name": name.text if name is not None else None,
        "disk_file": file_.get(_q(OVF, "href")),
        "disk_file_size": int(file_.get(_q(OVF, "size"), "0")),
        "disk_capacity": int(disk.get(_q(OVF, "capacity"), "0")),
        "disk_format": disk.get(_q(OVF, "format")),
        "cpus": int(items[CPU]["VirtualQuantity"]),
        "memory_mib": int(items[MEMORY]["VirtualQuantity"]),
        "firmware": config.get(_q(VMW, "value")) if config is not None else None,
    }
