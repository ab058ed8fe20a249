"""libvirt domain XML as small typed objects (pure: no process, no libvirt).

Each class has ``to_element()`` and ``from_element()``; children are written
in a fixed order so the output is deterministic and golden-testable, and
``from_element`` reads back both what we write and what libvirt returns from
``virDomainGetXMLDesc`` (which adds addresses, controllers, aliases…; those
are ignored).  Building a domain from user choices is ``build()``, a pure
function of a frozen ``DomainSpec``.

bcvk's own facts live in ``<metadata>`` under one namespace
(``xmlns:bootc="https://github.com/containers/bootc"``, upstream bcvk's),
with upstream's key names where they exist.  The private SSH key is never in
the XML: only the path of the file that holds it.
"""

from __future__ import annotations

import enum
import re
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from bcvk.errors import UsageError
from bcvk.guest.mounts import Share, ShareKind
from bcvk.values import Firmware, PortForward

BOOTC_NS = "https://github.com/containers/bootc"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("bootc", BOOTC_NS)
ET.register_namespace("qemu", QEMU_NS)

# The user-mode NIC lives in <qemu:commandline>, outside libvirt's address
# allocator: on q35 it needs an explicit slot on the root bus or it collides
# with libvirt's pcie-root-ports (found on libvirt 9.0).  libvirt fills slots
# from 0x01 upwards; 0x10 stays clear of them and of 0x1f (ICH9 functions).
NIC_PCI_ADDR = "0x10"
NIC_ID = "bcvk0"
SSH_GUEST_PORT = 22


def _q(tag: str, ns: str = BOOTC_NS) -> str:
    return f"{{{ns}}}{tag}"


class Enforcement(enum.StrEnum):
    """Who makes a --bind-ro share read-only."""

    libvirt = "libvirt"  # <readonly/> on the filesystem (libvirt ≥ 11)
    host = "host"  # virtiofsd --readonly through a <binary> wrapper
    guest = "guest"  # the guest mounts it with -o ro


# ------------------------------------------------------------------ metadata


@dataclass(frozen=True)
class Metadata:
    """bcvk's facts about a domain, stored in the domain XML itself."""

    source_image: str
    image_digest: str = ""
    ssh_port: int | None = None
    ssh_private_key_path: str | None = None
    ssh_generated: bool = True
    ssh_user: str = "root"
    memory_mb: int = 0
    vcpus: int = 0
    disk_size_gb: int | None = None
    filesystem: str | None = None
    network: str = "user"
    instance_type: str | None = None
    labels: tuple[str, ...] = ()
    firmware: str = Firmware.uefi.value
    ports: tuple[PortForward, ...] = ()
    mounts: tuple[Share, ...] = ()
    readonly_enforcement: str | None = None
    base_disk: str | None = None
    disk_volume: str | None = None
    pool: str | None = None
    cache_hash: str | None = None
    console_log: str | None = None
    tpm: bool = False
    transient: bool = False
    created: str = ""
    created_by: str = ""

    # (element name, attribute) for the scalar keys, in output order.
    _SCALARS = (
        ("source-image", "source_image"),
        ("image-digest", "image_digest"),
        ("memory-mb", "memory_mb"),
        ("vcpus", "vcpus"),
        ("disk-size-gb", "disk_size_gb"),
        ("filesystem", "filesystem"),
        ("network", "network"),
        ("instance-type", "instance_type"),
        ("firmware", "firmware"),
        ("ssh-port", "ssh_port"),
        ("ssh-user", "ssh_user"),
        ("ssh-generated", "ssh_generated"),
        ("ssh-private-key-path", "ssh_private_key_path"),
        ("readonly-enforcement", "readonly_enforcement"),
        ("pool", "pool"),
        ("base-disk", "base_disk"),
        ("disk-volume", "disk_volume"),
        ("cache-hash", "cache_hash"),
        ("console-log", "console_log"),
        ("tpm", "tpm"),
        ("transient", "transient"),
        ("created", "created"),
        ("created-by", "created_by"),
    )

    def to_element(self) -> ET.Element:
        root = ET.Element(_q("container"))
        for tag, attr in self._SCALARS:
            value = getattr(self, attr)
            if value is None or value == "":
                continue
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            ET.SubElement(root, _q(tag)).text = text
        if self.labels:
            # Upstream stores labels comma-joined in one element.
            ET.SubElement(root, _q("label")).text = ",".join(self.labels)
        for fwd in self.ports:
            ET.SubElement(root, _q("port-forward")).text = str(fwd)
        for mount in self.mounts:
            ET.SubElement(
                root,
                _q("mount"),
                {
                    "kind": mount.kind.value,
                    "source": mount.source,
                    "target": mount.target,
                    "tag": mount.tag,
                },
            )
        return root

    @classmethod
    def from_element(cls, root: ET.Element) -> Metadata | None:
        """Parse ``<bootc:container>``; None when it does not name a source image.

        Like upstream's reader, un-namespaced child names are accepted too.
        """

        def find(tag: str) -> str | None:
            for candidate in (_q(tag), tag):
                child = root.find(candidate)
                if child is not None:
                    return (child.text or "").strip()
            return None

        def findall(tag: str) -> list[ET.Element]:
            return root.findall(_q(tag)) + root.findall(tag)

        source = find("source-image")
        if not source:
            return None
        values: dict[str, object] = {}
        defaults = cls(source_image=source)
        for tag, attr in cls._SCALARS:
            text = find(tag)
            if text is None:
                continue
            default = getattr(defaults, attr)
            if isinstance(default, bool):
                values[attr] = text.lower() in ("true", "1", "yes")
            elif attr in ("ssh_port", "memory_mb", "vcpus", "disk_size_gb"):
                number = _leading_int(text)
                if number is not None:
                    values[attr] = number
            else:
                values[attr] = text
        label_text = find("label")
        if label_text:
            values["labels"] = tuple(x for x in label_text.split(",") if x)
        ports: list[PortForward] = []
        for el in findall("port-forward"):
            try:
                ports.append(PortForward.parse((el.text or "").strip()))
            except UsageError:
                continue
        values["ports"] = tuple(ports)
        mounts: list[Share] = []
        for el in findall("mount"):
            try:
                kind = ShareKind(el.get("kind", ""))
            except ValueError:
                continue
            mounts.append(
                Share(kind, el.get("source", ""), el.get("target", ""), el.get("tag", ""))
            )
        values["mounts"] = tuple(mounts)
        return replace(defaults, **values)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, object]:
        return {
            "source_image": self.source_image,
            "image_digest": self.image_digest or None,
            "memory_mb": self.memory_mb,
            "vcpus": self.vcpus,
            "disk_size_gb": self.disk_size_gb,
            "filesystem": self.filesystem,
            "instance_type": self.instance_type,
            "firmware": self.firmware,
            "ssh_port": self.ssh_port,
            "ssh_user": self.ssh_user,
            "ssh_private_key_path": self.ssh_private_key_path,
            "ssh_generated": self.ssh_generated,
            "labels": list(self.labels),
            "ports": [str(p) for p in self.ports],
            "mounts": [
                {"kind": m.kind.value, "source": m.source, "target": m.target, "tag": m.tag}
                for m in self.mounts
            ],
            "readonly_enforcement": self.readonly_enforcement,
            "pool": self.pool,
            "base_disk": self.base_disk,
            "disk_volume": self.disk_volume,
            "cache_hash": self.cache_hash,
            "console_log": self.console_log,
            "tpm": self.tpm,
            "transient": self.transient,
            "created": self.created or None,
            "created_by": self.created_by or None,
        }


def _leading_int(text: str) -> int | None:
    match = re.match(r"\s*(\d+)", text)
    return int(match.group(1)) if match else None


# ------------------------------------------------------------------ devices


@dataclass(frozen=True)
class Disk:
    source: str
    format: str = "qcow2"
    target: str = "vda"
    bus: str = "virtio"
    readonly: bool = False
    transient: bool = False  # QEMU-side overlay over a shared backing file

    def to_element(self) -> ET.Element:
        disk = ET.Element("disk", {"type": "file", "device": "disk"})
        ET.SubElement(disk, "driver", {"name": "qemu", "type": self.format})
        ET.SubElement(disk, "source", {"file": self.source})
        ET.SubElement(disk, "target", {"dev": self.target, "bus": self.bus})
        if self.readonly:
            ET.SubElement(disk, "readonly")
        if self.transient:
            ET.SubElement(disk, "transient", {"shareBacking": "yes"})
        return disk

    @classmethod
    def from_element(cls, el: ET.Element) -> Disk | None:
        source = el.find("source")
        path = None
        if source is not None:
            path = source.get("file") or source.get("dev") or source.get("name")
        if el.get("device", "disk") != "disk" or not path:
            return None
        driver = el.find("driver")
        target = el.find("target")
        return cls(
            source=path,
            format=driver.get("type", "raw") if driver is not None else "raw",
            target=target.get("dev", "") if target is not None else "",
            bus=target.get("bus", "") if target is not None else "",
            readonly=el.find("readonly") is not None,
            transient=el.find("transient") is not None,
        )


@dataclass(frozen=True)
class Filesystem:
    """A virtiofs share (libvirt starts virtiofsd for it)."""

    source: str
    tag: str
    binary: str | None = None  # virtiofsd (or bcvk's read-only wrapper)
    readonly: bool = False  # <readonly/>: only libvirt ≥ 11 accepts it on virtiofs
    queue: int = 1024

    def to_element(self) -> ET.Element:
        fs = ET.Element("filesystem", {"type": "mount", "accessmode": "passthrough"})
        ET.SubElement(fs, "driver", {"type": "virtiofs", "queue": str(self.queue)})
        if self.binary:
            ET.SubElement(fs, "binary", {"path": self.binary})
        ET.SubElement(fs, "source", {"dir": self.source})
        ET.SubElement(fs, "target", {"dir": self.tag})
        if self.readonly:
            ET.SubElement(fs, "readonly")
        return fs

    @classmethod
    def from_element(cls, el: ET.Element) -> Filesystem | None:
        driver = el.find("driver")
        source = el.find("source")
        target = el.find("target")
        if driver is None or driver.get("type") != "virtiofs" or source is None or target is None:
            return None
        binary = el.find("binary")
        return cls(
            source=source.get("dir", ""),
            tag=target.get("dir", ""),
            binary=binary.get("path") if binary is not None else None,
            readonly=el.find("readonly") is not None,
            queue=int(driver.get("queue", "1024")),
        )


@dataclass(frozen=True)
class Console:
    """The serial console (ttyS0) on a pty, optionally logged to a file."""

    log_file: str | None = None

    def to_elements(self) -> list[ET.Element]:
        serial = ET.Element("serial", {"type": "pty"})
        if self.log_file:
            ET.SubElement(serial, "log", {"file": self.log_file, "append": "on"})
        ET.SubElement(serial, "target", {"port": "0"})
        console = ET.Element("console", {"type": "pty"})
        ET.SubElement(console, "target", {"type": "serial", "port": "0"})
        return [serial, console]

    @classmethod
    def from_element(cls, el: ET.Element) -> Console:
        log = el.find("log")
        return cls(log.get("file") if log is not None else None)


@dataclass(frozen=True)
class Tpm:
    model: str = "tpm-crb"
    version: str = "2.0"

    def to_element(self) -> ET.Element:
        tpm = ET.Element("tpm", {"model": self.model})
        ET.SubElement(tpm, "backend", {"type": "emulator", "version": self.version})
        return tpm

    @classmethod
    def from_element(cls, el: ET.Element) -> Tpm:
        backend = el.find("backend")
        version = backend.get("version", "2.0") if backend is not None else "2.0"
        return cls(el.get("model", "tpm-crb"), version)


@dataclass(frozen=True)
class OsConfig:
    firmware: Firmware = Firmware.uefi
    arch: str = "x86_64"
    machine: str = "q35"
    smbios_sysinfo: bool = False  # take SMBIOS (type 11 strings) from <sysinfo>

    def to_element(self) -> ET.Element:
        attrs = {"firmware": "efi"} if self.firmware.is_uefi else {}
        os_el = ET.Element("os", attrs)
        type_el = ET.SubElement(os_el, "type", {"arch": self.arch, "machine": self.machine})
        type_el.text = "hvm"
        if self.firmware.is_uefi:
            # Without this libvirt 9 auto-selects the secure-boot OVMF with
            # Microsoft keys enrolled, which refuses unsigned systemd-boot.
            fw = ET.SubElement(os_el, "firmware")
            enabled = "yes" if self.firmware is Firmware.uefi_secure else "no"
            ET.SubElement(fw, "feature", {"enabled": enabled, "name": "secure-boot"})
        ET.SubElement(os_el, "boot", {"dev": "hd"})
        if self.smbios_sysinfo:
            ET.SubElement(os_el, "smbios", {"mode": "sysinfo"})
        return os_el

    @classmethod
    def from_element(cls, el: ET.Element) -> OsConfig:
        type_el = el.find("type")
        loader = el.find("loader")
        uefi = el.get("firmware") == "efi" or (
            loader is not None and loader.get("type", "pflash") == "pflash"
        )
        secure = False
        for feature in el.findall("firmware/feature"):
            if feature.get("name") == "secure-boot":
                secure = feature.get("enabled") == "yes"
        if loader is not None and loader.get("secure") == "yes":
            secure = True
        firmware = Firmware.bios
        if uefi:
            firmware = Firmware.uefi_secure if secure else Firmware.uefi
        machine = type_el.get("machine", "q35") if type_el is not None else "q35"
        # libvirt expands "q35" to a versioned alias such as pc-q35-7.2.
        if "q35" in machine:
            machine = "q35"
        smbios = el.find("smbios")
        return cls(
            firmware=firmware,
            arch=type_el.get("arch", "x86_64") if type_el is not None else "x86_64",
            machine=machine,
            smbios_sysinfo=smbios is not None and smbios.get("mode") == "sysinfo",
        )


# ------------------------------------------------------------------ domain


@dataclass(frozen=True)
class Domain:
    name: str
    uuid: str
    memory_mib: int
    vcpus: int
    type: str = "kvm"  # "qemu" under TCG
    os: OsConfig = field(default_factory=OsConfig)
    cpu_mode: str | None = None  # host-passthrough under KVM; libvirt's default under TCG
    shared_memory: bool = True  # memfd + shared: what vhost-user (virtiofs) needs
    disks: tuple[Disk, ...] = ()
    filesystems: tuple[Filesystem, ...] = ()
    console: Console | None = field(default_factory=Console)
    tpm: Tpm | None = None
    rng: bool = True
    oem_strings: tuple[str, ...] = ()  # SMBIOS type 11: systemd credentials
    qemu_args: tuple[str, ...] = ()
    metadata: Metadata | None = None

    def to_element(self) -> ET.Element:
        dom = ET.Element("domain", {"type": self.type})
        ET.SubElement(dom, "name").text = self.name
        ET.SubElement(dom, "uuid").text = self.uuid
        if self.metadata is not None:
            ET.SubElement(dom, "metadata").append(self.metadata.to_element())
        ET.SubElement(dom, "memory", {"unit": "MiB"}).text = str(self.memory_mib)
        ET.SubElement(dom, "currentMemory", {"unit": "MiB"}).text = str(self.memory_mib)
        ET.SubElement(dom, "vcpu").text = str(self.vcpus)
        if self.shared_memory:
            backing = ET.SubElement(dom, "memoryBacking")
            ET.SubElement(backing, "source", {"type": "memfd"})
            ET.SubElement(backing, "access", {"mode": "shared"})
        if self.oem_strings:
            sysinfo = ET.SubElement(dom, "sysinfo", {"type": "smbios"})
            oem = ET.SubElement(sysinfo, "oemStrings")
            for value in self.oem_strings:
                ET.SubElement(oem, "entry").text = value
        dom.append(self.os.to_element())
        features = ET.SubElement(dom, "features")
        ET.SubElement(features, "acpi")
        ET.SubElement(features, "apic")
        if self.os.arch in ("x86_64", "i686"):
            ET.SubElement(features, "vmport", {"state": "off"})
        if self.os.firmware is Firmware.uefi_secure:
            ET.SubElement(features, "smm", {"state": "on"})
        if self.cpu_mode:
            ET.SubElement(dom, "cpu", {"mode": self.cpu_mode})
        clock = ET.SubElement(dom, "clock", {"offset": "utc"})
        ET.SubElement(clock, "timer", {"name": "rtc", "tickpolicy": "catchup"})
        if self.os.arch in ("x86_64", "i686"):
            ET.SubElement(clock, "timer", {"name": "pit", "tickpolicy": "delay"})
            ET.SubElement(clock, "timer", {"name": "hpet", "present": "no"})
        ET.SubElement(dom, "on_poweroff").text = "destroy"
        ET.SubElement(dom, "on_reboot").text = "restart"
        ET.SubElement(dom, "on_crash").text = "destroy"
        devices = ET.SubElement(dom, "devices")
        for disk in self.disks:
            devices.append(disk.to_element())
        for fs in self.filesystems:
            devices.append(fs.to_element())
        if self.console is not None:
            devices.extend(self.console.to_elements())
        if self.rng:
            rng = ET.SubElement(devices, "rng", {"model": "virtio"})
            ET.SubElement(rng, "backend", {"model": "random"}).text = "/dev/urandom"
        if self.tpm is not None:
            devices.append(self.tpm.to_element())
        if self.qemu_args:
            cmdline = ET.SubElement(dom, _q("commandline", QEMU_NS))
            for arg in self.qemu_args:
                ET.SubElement(cmdline, _q("arg", QEMU_NS), {"value": arg})
        return dom

    def to_xml(self) -> str:
        root = self.to_element()
        ET.indent(root, space="  ")
        return ET.tostring(root, encoding="unicode") + "\n"

    @classmethod
    def from_element(cls, dom: ET.Element) -> Domain:
        devices = dom.find("devices")
        if devices is None:
            devices = ET.Element("devices")
        disks = tuple(d for d in map(Disk.from_element, devices.findall("disk")) if d)
        filesystems = tuple(
            f for f in map(Filesystem.from_element, devices.findall("filesystem")) if f
        )
        serial = devices.find("serial")
        tpm = devices.find("tpm")
        cpu = dom.find("cpu")
        backing = dom.find("memoryBacking")
        shared = backing is not None and any(
            a.get("mode") == "shared" for a in backing.findall("access")
        )
        os_el = dom.find("os")
        cmdline = dom.find(_q("commandline", QEMU_NS))
        qemu_args: tuple[str, ...] = ()
        if cmdline is not None:
            qemu_args = tuple(a.get("value", "") for a in cmdline.findall(_q("arg", QEMU_NS)))
        return cls(
            name=dom.findtext("name", ""),
            uuid=dom.findtext("uuid", ""),
            memory_mib=_mib(dom.find("memory")),
            vcpus=int(dom.findtext("vcpu", "0") or 0),
            type=dom.get("type", "kvm"),
            os=OsConfig.from_element(os_el) if os_el is not None else OsConfig(),
            cpu_mode=cpu.get("mode") if cpu is not None and cpu.get("mode") else None,
            shared_memory=shared,
            disks=disks,
            filesystems=filesystems,
            console=Console.from_element(serial) if serial is not None else None,
            tpm=Tpm.from_element(tpm) if tpm is not None else None,
            rng=devices.find("rng") is not None,
            oem_strings=tuple(e.text or "" for e in dom.findall("sysinfo/oemStrings/entry")),
            qemu_args=qemu_args,
            metadata=metadata_from_domain(dom),
        )

    @classmethod
    def from_xml(cls, text: str) -> Domain:
        return cls.from_element(ET.fromstring(text))


def _mib(el: ET.Element | None) -> int:
    if el is None or not (el.text or "").strip():
        return 0
    value = int((el.text or "0").strip())
    unit = el.get("unit", "KiB").lower()
    factor = {
        "b": 1,
        "bytes": 1,
        "k": 1024,
        "kib": 1024,
        "m": 1024**2,
        "mib": 1024**2,
        "g": 1024**3,
        "gib": 1024**3,
        "kb": 1000,
        "mb": 1000**2,
        "gb": 1000**3,
    }.get(unit, 1024)
    return value * factor // 1024**2


def metadata_from_domain(dom: ET.Element) -> Metadata | None:
    """bcvk's metadata from a whole ``<domain>`` element, if it has any."""
    container = dom.find(f"metadata/{_q('container')}")
    return Metadata.from_element(container) if container is not None else None


def metadata_from_xml(text: str | None) -> Metadata | None:
    """Parse a ``<bootc:container>`` element as libvirt's metadata API returns it.

    virDomainGetMetadata returns the element *without* a namespace prefix on
    its children (``<container><source-image>…``), which from_element accepts.
    """
    if not text:
        return None
    try:
        return Metadata.from_element(ET.fromstring(text))
    except ET.ParseError:
        return None


# ------------------------------------------------------------------ building


@dataclass(frozen=True)
class DomainSpec:
    """Everything ``build`` needs; values already validated and resolved."""

    name: str
    memory_mib: int
    vcpus: int
    disk_path: str
    disk_format: str = "qcow2"
    domain_type: str = "kvm"
    arch: str = "x86_64"
    firmware: Firmware = Firmware.uefi
    ssh_port: int = 2222
    ports: tuple[PortForward, ...] = ()
    filesystems: tuple[Filesystem, ...] = ()
    credentials: tuple[str, ...] = ()  # SMBIOS type 11 values
    tpm: bool = True
    console_log: str | None = None
    transient_disk: bool = False
    metadata: Metadata | None = None
    uuid: str | None = None


def machine_for(arch: str) -> str:
    return {"aarch64": "virt"}.get(arch, "q35")


def netdev_args(ssh_port: int, ports: Sequence[PortForward], machine: str = "q35") -> list[str]:
    """QEMU args for a user-mode NIC whose forwards listen on 127.0.0.1 only."""
    netdev = f"user,id={NIC_ID},hostfwd=tcp:127.0.0.1:{ssh_port}-:{SSH_GUEST_PORT}"
    for fwd in ports:
        netdev += f",hostfwd=tcp:127.0.0.1:{fwd.host}-:{fwd.guest}"
    device = f"virtio-net-pci,netdev={NIC_ID}"
    if machine == "q35":
        device += f",bus=pcie.0,addr={NIC_PCI_ADDR}"
    return ["-netdev", netdev, "-device", device]


def build(spec: DomainSpec) -> Domain:
    machine = machine_for(spec.arch)
    return Domain(
        name=spec.name,
        uuid=spec.uuid or str(uuidlib.uuid4()),
        memory_mib=spec.memory_mib,
        vcpus=spec.vcpus,
        type=spec.domain_type,
        os=OsConfig(
            firmware=spec.firmware,
            arch=spec.arch,
            machine=machine,
            smbios_sysinfo=bool(spec.credentials),
        ),
        # Under TCG libvirt's default (qemu64) it is: -cpu max reached SSH in 144-270 s
        # against 93 s here, as TCG emulates every extension the guest then uses.
        cpu_mode="host-passthrough" if spec.domain_type == "kvm" else None,
        shared_memory=True,
        disks=(
            Disk(source=spec.disk_path, format=spec.disk_format, transient=spec.transient_disk),
        ),
        filesystems=spec.filesystems,
        console=Console(spec.console_log),
        tpm=Tpm() if spec.tpm else None,
        rng=True,
        oem_strings=spec.credentials,
        qemu_args=tuple(netdev_args(spec.ssh_port, spec.ports, machine)),
        metadata=spec.metadata,
    )
