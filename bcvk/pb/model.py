"""pb's pure model: the metadata element, IDs and names, and a VM as `list` shows it."""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bcvk.errors import BcvkError, NotFoundError, UsageError
from bcvk.guest import credentials
from bcvk.host import ssh as sshlib
from bcvk.libvirt.metadata import BOOTC_NS
from bcvk.values import GIB, MIB, validate_vm_name

if TYPE_CHECKING:
    from bcvk.libvirt.vms import Vm

DOMAIN_PREFIX = "podman-bootc-"
ID_LENGTH = 12
MIN_DISK_SIZE = 10 * GIB  # podman-bootc: max(2 x image size, 10 GiB, --disk-size)
DEFAULT_MEMORY = 2048 * MIB
DEFAULT_CPUS = 2
SSH_TIMEOUT = 300.0  # as `bcvk libvirt`: TCG boots take minutes on a busy host
SESSION_POOL = "podman-bootc"
SYSTEM_POOL = "default"
LOCK_WAIT = 30.0  # a session waits this long for a stop/rm that holds the lock
CONTROL_PERSIST = "600"  # seconds an idle shared SSH connection stays up
# sun_path holds 108 bytes with the NUL; ssh binds "<ControlPath>.<16 random>" first.
MAX_CONTROL_PATH = 107 - 17
ELEMENT = "podman-bootc"
ID_RE = re.compile(r"[0-9a-f]{12}")


# ------------------------------------------------------------------ pure model


@dataclass(frozen=True)
class PbInfo:
    """What pb adds to a domain's bcvk metadata."""

    id: str
    name: str | None  # --name; None for the image's own VM
    image_id: str
    repository: str
    user: str = "root"
    disk_size: int = 0  # bytes; the disk inputs below are what `run` compares
    filesystem: str | None = None
    root_size: int | None = None
    cloudinit_iso: str | None = None

    def to_element(self) -> ET.Element:
        attrs = {
            "id": self.id,
            "image-id": self.image_id,
            "repository": self.repository,
            "user": self.user,
            "disk-size": str(self.disk_size),
        }
        optional = {
            "name": self.name,
            "filesystem": self.filesystem,
            "root-size": str(self.root_size) if self.root_size is not None else None,
            "cloudinit-iso": self.cloudinit_iso,
        }
        attrs.update({k: v for k, v in optional.items() if v is not None})
        return ET.Element(f"{{{BOOTC_NS}}}{ELEMENT}", dict(sorted(attrs.items())))

    @classmethod
    def from_element(cls, el: ET.Element) -> PbInfo | None:
        vm_id = el.get("id", "")
        if not ID_RE.fullmatch(vm_id):
            return None
        root_size = el.get("root-size")
        return cls(
            id=vm_id,
            name=el.get("name"),
            image_id=el.get("image-id", ""),
            repository=el.get("repository", ""),
            user=el.get("user", "root"),
            disk_size=int(el.get("disk-size", "0") or 0),
            filesystem=el.get("filesystem"),
            root_size=int(root_size) if root_size and root_size.isdigit() else None,
            cloudinit_iso=el.get("cloudinit-iso"),
        )


def pb_info_from_xml(xml_text: str) -> PbInfo | None:
    """The pb element of a domain's XML, or None for a domain that is not a pb VM."""
    root = ET.fromstring(xml_text)
    container = root.find(f"metadata/{{{BOOTC_NS}}}container")
    if container is None:
        return None
    el = container.find(f"{{{BOOTC_NS}}}{ELEMENT}")
    return PbInfo.from_element(el) if el is not None else None


def patch_domain_xml(
    xml_text: str,
    info: PbInfo,
    *,
    seed_iso: str | None = None,
    tmpfiles_credential: str | None = None,
) -> str:
    """The domain XML with the pb element, the cloud-init CD-ROM and the user's key (pure)."""
    root = ET.fromstring(xml_text)
    container = root.find(f"metadata/{{{BOOTC_NS}}}container")
    if container is None:
        raise BcvkError(
            f"domain {root.findtext('name')} has no bcvk metadata to mark as pb",
            hint="only VMs bcvk created can be podman-bootc VMs",
        )
    for old in container.findall(f"{{{BOOTC_NS}}}{ELEMENT}"):
        container.remove(old)
    container.append(info.to_element())
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    if seed_iso:
        cdrom = ET.SubElement(devices, "disk", {"type": "file", "device": "cdrom"})
        ET.SubElement(cdrom, "driver", {"name": "qemu", "type": "raw"})
        ET.SubElement(cdrom, "source", {"file": seed_iso})
        ET.SubElement(cdrom, "target", {"dev": "sda", "bus": "sata"})
        ET.SubElement(cdrom, "readonly")
    if tmpfiles_credential:
        prefix = f"io.systemd.credential.binary:{credentials.TMPFILES_CREDENTIAL}="
        entries = root.findall("sysinfo/oemStrings/entry")
        target = next((e for e in entries if (e.text or "").startswith(prefix)), None)
        if target is None:
            raise BcvkError(
                "the domain carries no SSH key credential to extend",
                hint="recreate the VM with `bcvk pb run`",
            )
        target.text = tmpfiles_credential
    return ET.tostring(root, encoding="unicode")


def user_home(user: str) -> str:
    return "/root" if user == "root" else f"/home/{user}"


def key_credential(public_key: str, user: str) -> str:
    """An SMBIOS credential installing PUBLIC_KEY for root and USER (pure)."""
    content = credentials.tmpfiles_authorized_key(public_key)
    if user != "root":
        content += credentials.tmpfiles_authorized_key(public_key, user, user_home(user))
    return credentials.smbios_value(credentials.TMPFILES_CREDENTIAL, content)


def default_disk_size(image_size: int, requested: int | None) -> int:
    """podman-bootc's rule: max(2 x image size, 10 GiB, --disk-size), in whole MiB."""
    size = max(2 * image_size, MIN_DISK_SIZE, requested or 0)
    return -(-size // MIB) * MIB


def image_vm_id(image_id: str) -> str:
    hexid = image_id.removeprefix("sha256:")
    if not re.match(r"^[0-9a-f]{12}", hexid):
        raise BcvkError(
            f"unexpected image ID {image_id!r}",
            hint="podman gave an image ID that is not hexadecimal; `podman images` shows it",
        )
    return hexid[:ID_LENGTH]


def new_id(taken: set[str]) -> str:
    while True:
        candidate = secrets.token_hex(ID_LENGTH // 2)
        if candidate not in taken:
            return candidate


def domain_name(vm_id: str, name: str | None) -> str:
    return validate_vm_name(name) if name else DOMAIN_PREFIX + vm_id


@dataclass(frozen=True)
class PbVm:
    """A pb VM as `list`/`inspect` show it."""

    info: PbInfo
    vm: Vm
    in_use: bool = False

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def name(self) -> str:
        return self.vm.name

    @property
    def running(self) -> bool:
        return self.vm.running

    @property
    def ssh_port(self) -> int | None:
        return self.vm.metadata.ssh_port

    @property
    def created(self) -> str:
        return self.vm.metadata.created

    @property
    def image(self) -> str:
        return self.info.repository or self.vm.metadata.source_image

    def target(self, user: str | None = None) -> sshlib.Target:
        return dataclasses.replace(self.vm.ssh_target(), user=user or self.info.user)

    def to_json(self) -> dict[str, object]:
        md = self.vm.metadata
        return {
            "id": self.id,
            "name": self.name,
            "image": self.image,
            "image_id": self.info.image_id,
            "running": self.running,
            "state": self.vm.state,
            "in_use": self.in_use,
            "ssh_port": self.ssh_port,
            "ssh_user": self.info.user,
            "ssh_private_key_path": md.ssh_private_key_path,
            "ports": [str(p) for p in md.ports],
            "volumes": [f"{m.source}:{m.target}" for m in md.mounts],
            "created": self.created or None,
            "disk_size": self.info.disk_size,
            "disk_path": self.vm.disks[0] if self.vm.disks else None,
            "base_disk": md.base_disk,
            "filesystem": self.info.filesystem,
            "cloudinit_iso": self.info.cloudinit_iso,
            "memory_mb": self.vm.memory_mib or md.memory_mb,
            "vcpus": self.vm.vcpus or md.vcpus,
            "uri": self.vm.uri,
        }


def resolve(vms: Sequence[PbVm], ref: str) -> PbVm:
    """The VM REF names: an ID, a name (domain or --name), or a unique ID prefix."""
    for vm in vms:
        if ref in (vm.id, vm.name, vm.info.name):
            return vm
    matches = [vm for vm in vms if ref and vm.id.startswith(ref.lower())]
    if len(matches) == 1:
        return matches[0]
    if matches:
        listed = ", ".join(f"{m.id} ({m.name})" for m in sorted(matches, key=lambda m: m.id))
        raise UsageError(
            f"ID prefix {ref!r} is ambiguous: it matches {listed}",
            hint="give more digits of the ID, or the VM's name",
        )
    raise NotFoundError(f"no podman-bootc VM {ref!r}", hint="`bcvk pb list` shows the VMs")


def find(vms: Sequence[PbVm], ref: str) -> PbVm | None:
    try:
        return resolve(vms, ref)
    except NotFoundError:
        return None


def latest(vms: Sequence[PbVm]) -> PbVm:
    if not vms:
        raise NotFoundError("there are no podman-bootc VMs", hint="create one with `bcvk pb run`")
    return max(vms, key=lambda v: (v.created, v.id))


def effective_uri(uri: str | None) -> str:
    """The URI a connection would use (connection.default_uri's rule, without importing it)."""
    if uri:
        return uri
    env = os.environ.get("LIBVIRT_DEFAULT_URI")
    if env:
        return env
    return "qemu:///system" if os.geteuid() == 0 else "qemu:///session"
