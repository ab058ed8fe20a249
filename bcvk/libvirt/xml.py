"""libvirt domain XML as small typed objects (pure: no process, no libvirt).

Each class has ``to_element()`` and ``from_element()``; children are written
in a fixed order so the output is deterministic and golden-testable, and
``from_element`` reads back both what we write and what libvirt returns from
``virDomainGetXMLDesc`` (which adds addresses, controllers, aliases…; those
are ignored).  Building a domain from user choices is ``build()``, a pure
function of a frozen ``DomainSpec``.

bcvk's own facts live in ``<metadata>`` (``bcvk.libvirt.metadata``).
"""

from __future__ import annotations

import enum
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field

from bcvk.libvirt.metadata import BOOTC_NS as BOOTC_NS
from bcvk.libvirt.metadata import Metadata as Metadata
from bcvk.libvirt.metadata import Project as Project
from bcvk.libvirt.metadata import metadata_from_xml as metadata_from_xml
from bcvk.libvirt.metadata import q
from bcvk.values import Firmware, PortForward

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_NS)

# The user-mode NIC lives in <qemu:commandline>, outside libvirt's address
# allocator: on q35 it needs an explicit slot on the root bus or it collides
# with libvirt's pcie-root-ports (found on libvirt 9.0).  libvirt fills slots
# from 0x01 upwards; 0x10 stays clear of them and of 0x1f (ICH9 functions).
NIC_PCI_ADDR = "0x10"
NIC_ID = "bcvk0"
SSH_GUEST_PORT = 22


class Enforcement(enum.StrEnum):
    """Who makes a --bind-ro share read-only."""

    libvirt = "libvirt"  # <readonly/> on the filesystem (libvirt ≥ 11)
    host = "host"  # virtiofsd --readonly through a <binary> wrapper
    guest = "guest"  # the guest mounts it with -o ro


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
class Channel:
    """A virtio-serial port the guest writes to (``/dev/virtio-ports/NAME``),
    appended to a file on the host."""

    name: str
    path: str

    def to_element(self) -> ET.Element:
        channel = ET.Element("channel", {"type": "file"})
        ET.SubElement(channel, "source", {"path": self.path, "append": "on"})
        ET.SubElement(channel, "target", {"type": "virtio", "name": self.name})
        return channel

    @classmethod
    def from_element(cls, el: ET.Element) -> Channel | None:
        source, target = el.find("source"), el.find("target")
        if el.get("type") != "file" or source is None or target is None:
            return None
        if target.get("type") != "virtio":
            return None
        return cls(target.get("name", ""), source.get("path", ""))


# OVMF writes its debug log to this I/O port (QEMU's isa-debugcon).
DEBUGCON_IOBASE = "0x402"


@dataclass(frozen=True)
class FirmwareLog:
    """The firmware's debug port on a pty, as upstream's --firmware-log, logged to a file."""

    log_file: str | None = None

    def to_element(self) -> ET.Element:
        serial = ET.Element("serial", {"type": "pty"})
        if self.log_file:
            ET.SubElement(serial, "log", {"file": self.log_file, "append": "on"})
        target = ET.SubElement(serial, "target", {"type": "isa-debug", "port": "1"})
        ET.SubElement(target, "model", {"name": "isa-debugcon"})
        ET.SubElement(serial, "address", {"type": "isa", "iobase": DEBUGCON_IOBASE})
        return serial

    @staticmethod
    def matches(el: ET.Element) -> bool:
        target = el.find("target")
        return target is not None and target.get("type") == "isa-debug"

    @classmethod
    def from_element(cls, el: ET.Element) -> FirmwareLog:
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
    # Secure Boot with the user's keys: this OVMF code, and the variable store
    # with their keys that libvirt copies into the VM's own NVRAM file.
    loader: str | None = None
    nvram_template: str | None = None

    def to_element(self) -> ET.Element:
        manual = self.loader is not None
        attrs = {"firmware": "efi"} if self.firmware.is_uefi and not manual else {}
        os_el = ET.Element("os", attrs)
        type_el = ET.SubElement(os_el, "type", {"arch": self.arch, "machine": self.machine})
        type_el.text = "hvm"
        if manual:
            secure = "yes" if self.firmware is Firmware.uefi_secure else "no"
            loader = ET.SubElement(
                os_el, "loader", {"readonly": "yes", "secure": secure, "type": "pflash"}
            )
            loader.text = self.loader
            if self.nvram_template:
                ET.SubElement(os_el, "nvram", {"template": self.nvram_template})
        elif self.firmware.is_uefi:
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
        nvram = el.find("nvram")
        manual = loader is not None and el.get("firmware") != "efi" and bool(loader.text)
        return cls(
            firmware=firmware,
            arch=type_el.get("arch", "x86_64") if type_el is not None else "x86_64",
            machine=machine,
            smbios_sysinfo=smbios is not None and smbios.get("mode") == "sysinfo",
            loader=(loader.text or "").strip() if manual and loader is not None else None,
            nvram_template=nvram.get("template") if manual and nvram is not None else None,
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
    firmware_log: FirmwareLog | None = None
    channels: tuple[Channel, ...] = ()
    tpm: Tpm | None = None
    rng: bool = True
    oem_strings: tuple[str, ...] = ()  # SMBIOS type 11: systemd credentials
    qemu_args: tuple[str, ...] = ()
    metadata: Metadata | None = None
    cdroms: tuple[str, ...] = ()  # read only: the files of CD-ROM devices

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
        if self.firmware_log is not None:
            devices.append(self.firmware_log.to_element())
        devices.extend(channel.to_element() for channel in self.channels)
        if self.rng:
            rng = ET.SubElement(devices, "rng", {"model": "virtio"})
            ET.SubElement(rng, "backend", {"model": "random"}).text = "/dev/urandom"
        if self.tpm is not None:
            devices.append(self.tpm.to_element())
        if self.qemu_args:
            cmdline = ET.SubElement(dom, q("commandline", QEMU_NS))
            for arg in self.qemu_args:
                ET.SubElement(cmdline, q("arg", QEMU_NS), {"value": arg})
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
        serials = devices.findall("serial")
        serial = next((el for el in serials if not FirmwareLog.matches(el)), None)
        debugcon = next((el for el in serials if FirmwareLog.matches(el)), None)
        tpm = devices.find("tpm")
        cpu = dom.find("cpu")
        backing = dom.find("memoryBacking")
        shared = backing is not None and any(
            a.get("mode") == "shared" for a in backing.findall("access")
        )
        os_el = dom.find("os")
        cmdline = dom.find(q("commandline", QEMU_NS))
        qemu_args: tuple[str, ...] = ()
        if cmdline is not None:
            qemu_args = tuple(a.get("value", "") for a in cmdline.findall(q("arg", QEMU_NS)))
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
            firmware_log=FirmwareLog.from_element(debugcon) if debugcon is not None else None,
            channels=tuple(
                c for c in map(Channel.from_element, devices.findall("channel")) if c is not None
            ),
            tpm=Tpm.from_element(tpm) if tpm is not None else None,
            rng=devices.find("rng") is not None,
            oem_strings=tuple(e.text or "" for e in dom.findall("sysinfo/oemStrings/entry")),
            qemu_args=qemu_args,
            metadata=metadata_from_domain(dom),
            cdroms=tuple(
                s.get("file", "")
                for d in devices.findall("disk")
                if d.get("device") == "cdrom" and (s := d.find("source")) is not None
            ),
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
    container = dom.find(f"metadata/{q('container')}")
    return Metadata.from_element(container) if container is not None else None


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
    loader: str | None = None  # as OsConfig: Secure Boot with the user's keys
    nvram_template: str | None = None
    arch: str = "x86_64"
    firmware: Firmware = Firmware.uefi
    ssh_port: int = 2222
    ports: tuple[PortForward, ...] = ()
    filesystems: tuple[Filesystem, ...] = ()
    credentials: tuple[str, ...] = ()  # SMBIOS type 11 values
    tpm: bool = True
    console_log: str | None = None
    firmware_log: FirmwareLog | None = None  # --firmware-log
    channels: tuple[Channel, ...] = ()  # --log-dir journal=
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
            loader=spec.loader,
            nvram_template=spec.nvram_template,
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
        firmware_log=spec.firmware_log,
        channels=spec.channels,
        tpm=Tpm() if spec.tpm else None,
        rng=True,
        oem_strings=spec.credentials,
        # ssh_port 0: --network none, no NIC at all
        qemu_args=tuple(netdev_args(spec.ssh_port, spec.ports, machine) if spec.ssh_port else ()),
        metadata=spec.metadata,
    )
