"""bcvk's view of libvirt domains: names, ports, mounts, and a VM read from its XML.

Pure except for the readers at the end, which only list and look up domains.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bcvk import paths
from bcvk.errors import BcvkError
from bcvk.host import ssh
from bcvk.libvirt import xml as lx
from bcvk.libvirt.connection import Connection, DomainNotFound, DomainRef
from bcvk.libvirt.uri import UriInfo
from bcvk.values import GIB, MIB, parse_itype, parse_memory, parse_vcpus, validate_vm_name

SSH_PORT_RANGE = (2222, 2999)
DEFAULT_MEMORY = 4 * GIB
DEFAULT_VCPUS = 2


# ------------------------------------------------------------------ pure helpers


def derive_name(image: str, taken: set[str] | frozenset[str] = frozenset()) -> str:
    """A domain name from IMAGE: the last path part, up to its tag, made safe.

    ``quay.io/fedora/fedora-bootc:42`` → ``fedora-bootc``; when that is taken,
    ``fedora-bootc-2``, ``fedora-bootc-3``, …
    """
    last = image.rsplit("/", 1)[-1]
    last = last.split("@", 1)[0].split(":", 1)[0]
    base = re.sub(r"[^A-Za-z0-9_-]", "-", last).strip("-") or "bootc"
    base = base[:56]
    if base not in taken:
        return base
    n = 2
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"


def resources(
    memory: int | None, vcpus: int | None, itype: str | None
) -> tuple[int, int, str | None]:
    """(memory MiB, vCPUs, instance type); an instance type overrides both.

    MEMORY is in bytes (already parsed); the limits are those of every command.
    """
    if itype:
        cpus, mib = parse_itype(itype)
        return mib, cpus, itype
    mib = parse_memory((memory or DEFAULT_MEMORY) // MIB)
    cpus = parse_vcpus(vcpus if vcpus is not None else DEFAULT_VCPUS, "--cpus")
    return mib, cpus, None


def used_ports(vms: Sequence[Vm]) -> set[int]:
    ports: set[int] = set()
    for vm in vms:
        if vm.metadata.ssh_port:
            ports.add(vm.metadata.ssh_port)
        ports.update(p.host for p in vm.metadata.ports)
    return ports


def port_bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ssh_port(taken: set[int], check_local: bool, rng: random.Random | None = None) -> int:
    """A port in 2222-2999 that no bcvk VM uses and (locally) nothing listens on."""
    low, high = SSH_PORT_RANGE
    candidates = list(range(low, high + 1))
    (rng or random.Random()).shuffle(candidates)
    for port in candidates:
        if port in taken:
            continue
        if check_local and not port_bindable(port):
            continue
        return port
    raise BcvkError(
        f"no free SSH port in {low}-{high}", hint="remove unused VMs with `bcvk libvirt rm`"
    )


def key_dir(uuid: str) -> Path:
    return paths.data_dir() / "libvirt" / uuid


def readonly_mode(
    lib_version: tuple[int, int, int], local: bool, has_virtiofsd: bool
) -> lx.Enforcement:
    """How --bind-ro is made read-only with this libvirt."""
    if lib_version >= (11, 0, 0):
        return lx.Enforcement.libvirt
    if local and has_virtiofsd:
        return lx.Enforcement.host
    return lx.Enforcement.guest


def readonly_wrapper_text(real: Path) -> str:
    return (
        "#!/bin/sh\n"
        "# Written by bcvk: libvirt < 11 cannot mark a virtiofs share read-only,\n"
        "# so --bind-ro shares run virtiofsd through this wrapper.\n"
        f'exec {shlex.quote(os.fspath(real))} "$@" --readonly\n'
    )


# ------------------------------------------------------------------ VM view


@dataclass(frozen=True)
class Vm:
    """What ``list``/``inspect`` show about a bcvk domain."""

    name: str
    uuid: str
    state: str
    persistent: bool
    metadata: lx.Metadata
    disks: tuple[str, ...] = ()
    memory_mib: int = 0
    vcpus: int = 0
    uri: str = ""
    ssh_proxy_jump: str | None = None
    ssh_proxy_command: str | None = None
    console_log: str | None = None  # the serial log the domain's XML names
    firmware_log: str | None = None  # --firmware-log's, likewise
    cdroms: tuple[str, ...] = ()

    @property
    def copied_from(self) -> str | None:
        """The domain whose metadata this one carries (a copy, e.g. by virt-clone), or None."""
        md = self.metadata
        if md.domain_uuid:
            if (md.domain_uuid, md.domain_name) == (self.uuid, self.name):
                return None
            return md.domain_name or md.domain_uuid
        # Made before bcvk recorded identities: a key bcvk generated sits in the
        # key directory of the domain's UUID.
        key = md.ssh_private_key_path
        if md.ssh_generated and key:
            directory = Path(key).parent
            if directory.parent == key_dir("x").parent and directory.name != self.uuid:
                return directory.name
        return None

    @property
    def running(self) -> bool:
        return self.state == "running"

    def ssh_target(self, timeout: int = 5) -> ssh.Target:
        md = self.metadata
        if not md.ssh_port or not md.ssh_private_key_path:
            raise BcvkError(
                f"VM {self.name} has no SSH port or key recorded in its metadata",
                hint="it was created without SSH; recreate it with `bcvk libvirt run --replace`",
            )
        return ssh.Target(
            port=md.ssh_port,
            key=Path(md.ssh_private_key_path),
            user=md.ssh_user or "root",
            proxy_jump=self.ssh_proxy_jump,
            proxy_command=self.ssh_proxy_command,
            connect_timeout=timeout,
        )

    def to_json(self) -> dict[str, object]:
        md = self.metadata
        return {
            "name": self.name,
            "uuid": self.uuid,
            "state": self.state,
            "persistent": self.persistent,
            "image": md.source_image,
            "image_digest": md.image_digest or None,
            "memory_mb": self.memory_mib or md.memory_mb,
            "vcpus": self.vcpus or md.vcpus,
            "disk_path": self.disks[0] if self.disks else None,
            "labels": list(md.labels),
            "ssh_host": "127.0.0.1",
            "ssh_port": md.ssh_port,
            "ssh_user": md.ssh_user,
            "ssh_private_key_path": md.ssh_private_key_path,
            "has_ssh_key": bool(md.ssh_private_key_path),
            "ssh_proxy_jump": self.ssh_proxy_jump,
            "ssh_proxy_command": self.ssh_proxy_command,
            "ports": [str(p) for p in md.ports],
            "created": md.created or None,
            "uri": self.uri,
        }

    def details(self) -> dict[str, object]:
        data = self.to_json()
        data["metadata"] = self.metadata.to_json()
        data["disks"] = list(self.disks)
        # what the domain's XML logs to now (the metadata has the one it was made with)
        data["console_log"] = self.console_log
        data["firmware_log"] = self.firmware_log
        return data


def vm_from_xml(
    xml_text: str,
    state: str,
    persistent: bool,
    uri: str = "",
    jump: str | None = None,
    proxy_command: str | None = None,
) -> Vm | None:
    """A Vm from a domain's XML, or None when bcvk did not create it (pure)."""
    dom = lx.Domain.from_xml(xml_text)
    if dom.metadata is None:
        return None
    return Vm(
        name=dom.name,
        uuid=dom.uuid,
        state=state,
        persistent=persistent,
        metadata=dom.metadata,
        disks=tuple(d.source for d in dom.disks),
        memory_mib=dom.memory_mib,
        vcpus=dom.vcpus,
        uri=uri,
        ssh_proxy_jump=jump,
        ssh_proxy_command=proxy_command,
        console_log=dom.console.log_file if dom.console else None,
        firmware_log=dom.firmware_log.log_file if dom.firmware_log else None,
        cdroms=dom.cdroms,
    )


def read_vm(conn: Connection, dom: DomainRef) -> Vm | None:
    return vm_from_xml(
        dom.xml(),
        dom.state(),
        dom.is_persistent(),
        conn.requested_uri,
        conn.info.ssh_jump,
        conn.info.ssh_proxy_command,
    )


def filter_vms(vms: Sequence[Vm], *, all_states: bool, label: str | None) -> list[Vm]:
    out = [v for v in vms if all_states or v.running]
    if label:
        out = [v for v in out if label in v.metadata.labels]
    return sorted(out, key=lambda v: v.name)


def all_vms(conn: Connection) -> list[Vm]:
    vms: list[Vm] = []
    for dom in conn.domains():
        try:
            vm = read_vm(conn, dom)
        except DomainNotFound:
            continue  # removed while we listed: it simply is not there any more
        if vm is not None:
            vms.append(vm)
    return vms


def get_vm(conn: Connection, name: str, *, copies: bool = False) -> tuple[DomainRef, Vm]:
    """Domain NAME and bcvk's view of it; a copy of a bcvk VM only with COPIES.

    A copy's metadata names another VM's key, disk and log: trusting it would
    reach into that VM, so every verb but ``rm -f`` refuses it.
    """
    dom = conn.get(validate_vm_name(name))
    vm = read_vm(conn, dom)
    if vm is None:
        raise BcvkError(
            f"domain {name!r} was not created by bcvk (it has no bootc metadata)",
            hint="bcvk only manages its own VMs; use virsh for this one",
        )
    origin = vm.copied_from
    if origin is not None and not copies:
        raise BcvkError(
            f"domain {name!r} carries the metadata of VM {origin!r}: it is a copy "
            "(virt-clone?), not a VM bcvk made",
            hint=f"`bcvk libvirt rm -f {name}` removes the copy and only the disk named for "
            f"it ({name}.qcow2); {origin}'s disk and key are left alone",
        )
    return dom, vm


def qemu_dir(info: UriInfo, session: str, system: str) -> Path | None:
    """A directory of the local QEMU driver: SESSION under the home directory
    for qemu:///session, SYSTEM for qemu:///system (None: remote, other drivers)."""
    if info.remote or info.driver != "qemu":
        return None
    return Path.home() / session if info.session else Path(system)


def default_log(info: UriInfo, name: str, kind: str) -> str | None:
    """Where bcvk asks libvirt to log NAME's KIND ("console", "firmware")
    port unless told (None: no file it can name)."""
    base = qemu_dir(info, ".cache/libvirt/qemu/log", "/var/log/libvirt/qemu")
    return os.fspath(base / f"{name}-{kind}.log") if base else None


def default_console_log(info: UriInfo, name: str) -> str | None:
    """Where bcvk asks libvirt to log NAME's serial console."""
    return default_log(info, name, "console")
