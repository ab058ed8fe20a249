"""bcvk's facts about a domain, kept in the domain's own ``<metadata>`` (pure).

One namespace (``xmlns:bootc="https://github.com/containers/bootc"``,
upstream bcvk's) with upstream's key names where they exist.  libvirt is the
only record: ``list``, ``inspect``, ``ssh`` and ``rm`` read this and nothing
else.  The private SSH key is never here, only the path of its file.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace

from bcvk.errors import UsageError
from bcvk.guest.mounts import Share, ShareKind
from bcvk.values import Firmware, PortForward

BOOTC_NS = "https://github.com/containers/bootc"
ET.register_namespace("bootc", BOOTC_NS)


def q(tag: str, ns: str = BOOTC_NS) -> str:
    """TAG in namespace NS, as ElementTree spells it."""
    return f"{{{ns}}}{tag}"


@dataclass(frozen=True)
class Project:
    """The ``bcvk.toml`` a domain was made from (``bcvk up``): the file's
    absolute path, the VM's name in it, and its settings as applied (JSON),
    which ``bcvk status`` compares with the file."""

    file: str
    vm: str
    settings: str

    def to_element(self) -> ET.Element:
        el = ET.Element(q("project"), {"file": self.file, "vm": self.vm})
        el.text = self.settings
        return el

    @classmethod
    def from_element(cls, el: ET.Element) -> Project | None:
        file, vm = el.get("file", ""), el.get("vm", "")
        return cls(file, vm, (el.text or "").strip()) if file and vm else None


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
    # The domain this metadata was written for: a copy (virt-clone keeps
    # <metadata>) carries another domain's name and UUID.
    domain_name: str = ""
    domain_uuid: str = ""
    project: Project | None = None

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
        ("domain-name", "domain_name"),
        ("domain-uuid", "domain_uuid"),
    )

    def to_element(self) -> ET.Element:
        root = ET.Element(q("container"))
        for tag, attr in self._SCALARS:
            value = getattr(self, attr)
            if value is None or value == "":
                continue
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            ET.SubElement(root, q(tag)).text = text
        if self.labels:
            # Upstream stores labels comma-joined in one element.
            ET.SubElement(root, q("label")).text = ",".join(self.labels)
        for fwd in self.ports:
            ET.SubElement(root, q("port-forward")).text = str(fwd)
        for mount in self.mounts:
            ET.SubElement(
                root,
                q("mount"),
                {
                    "kind": mount.kind.value,
                    "source": mount.source,
                    "target": mount.target,
                    "tag": mount.tag,
                },
            )
        if self.project is not None:
            root.append(self.project.to_element())
        return root

    @classmethod
    def from_element(cls, root: ET.Element) -> Metadata | None:
        """Parse ``<bootc:container>``; None when it does not name a source image.

        Like upstream's reader, un-namespaced child names are accepted too.
        """

        def find(tag: str) -> str | None:
            for candidate in (q(tag), tag):
                child = root.find(candidate)
                if child is not None:
                    return (child.text or "").strip()
            return None

        def findall(tag: str) -> list[ET.Element]:
            return root.findall(q(tag)) + root.findall(tag)

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
        for el in findall("project"):
            values["project"] = Project.from_element(el)
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
            "domain_name": self.domain_name or None,
            "domain_uuid": self.domain_uuid or None,
            "project": (
                {"file": self.project.file, "vm": self.project.vm} if self.project else None
            ),
        }


def _leading_int(text: str) -> int | None:
    match = re.match(r"\s*(\d+)", text)
    return int(match.group(1)) if match else None


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
