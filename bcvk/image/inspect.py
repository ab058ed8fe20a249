"""`bcvk images`: find bootc images and judge whether they can boot."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from typing import Any

from bcvk.host import podman
from bcvk.image import inns
from bcvk.image.facts import TreeFacts, probe_json

# podman/OCI architecture names for `platform.machine()` values.
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64le", "s390x": "s390x"}


def host_arch() -> str:
    machine = platform.machine()
    return _ARCH.get(machine, machine)


@dataclass(frozen=True)
class ImageSummary:
    name: str
    repository: str
    tag: str
    id: str
    digest: str
    created: str
    size: int


def summaries_from_podman(entries: list[dict[str, Any]]) -> list[ImageSummary]:
    """One row per name (an image with two tags is listed twice, as podman does)."""
    rows: list[ImageSummary] = []
    for entry in entries:
        names = entry.get("Names") or ["<none>:<none>"]
        for name in names:
            repo, tag = podman.split_reference(name)
            rows.append(
                ImageSummary(
                    name=name,
                    repository=repo,
                    tag=tag,
                    id=str(entry.get("Id", "")),
                    digest=str(entry.get("Digest", "")),
                    created=str(entry.get("CreatedAt") or entry.get("Created", "")),
                    size=int(entry.get("Size", 0)),
                )
            )
    rows.sort(key=lambda r: (r.repository, r.tag))
    return rows


def list_bootc() -> list[ImageSummary]:
    return summaries_from_podman(podman.list_images())


def list_bootc_entries() -> list[dict[str, Any]]:
    """The bootc images as podman describes them (``Names``, ``Id``, ``Size``, …), by name.

    podman leaves ``Names`` out for an image no tag points to; bcvk gives it an
    empty list, so every entry has the key a consumer looks up first.
    """
    entries = [{**e, "Names": e.get("Names") or []} for e in podman.list_images()]
    return sorted(entries, key=lambda e: (e["Names"] or [""])[0])


@dataclass(frozen=True)
class Report:
    image: str
    info: podman.ImageInfo
    facts: TreeFacts
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def bootable(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, object]:
        f = self.facts
        kernel: dict[str, object] | None = None
        if len(f.kernels) == 1:
            k = f.kernels[0]
            kernel = {
                "version": k.version,
                "kind": k.kind,
                "path": k.path,
                "initramfs": k.initramfs,
            }
        return {
            "image": self.image,
            "bootable": self.bootable,
            "problems": list(self.problems),
            "warnings": list(self.warnings),
            "bootc_label": self.info.is_bootc,
            "architecture": self.info.architecture,
            "os": {
                "id": f.os_release.get("ID"),
                "version_id": f.os_release.get("VERSION_ID"),
                "pretty_name": f.os_release.get("PRETTY_NAME"),
            },
            "kernel": kernel,
            "kernels": [k.__dict__ for k in f.kernels],
            "init": f.init,
            "systemd_version": f.systemd_version,
            "sshd_installed": f.sshd_installed,
            "sshd_enabled": f.sshd_enabled,
            "has_bootc": f.has_bootc,
            "has_cloud_init": f.has_cloud_init,
            "selinux_policy": f.selinux,
            "default_target": f.default_target,
            "initramfs_generator": f.initramfs_generator,
            "initramfs_can_mount": dict(f.initramfs),
            "size": self.info.size,
            "digest": self.info.digest,
            "id": self.info.id,
        }


def initramfs_problems(caps: dict[str, bool]) -> list[str]:
    """Why an initramfs with capabilities CAPS cannot boot an ephemeral VM."""
    if not (caps.get("systemd") or caps.get("initramfs_tools")):
        return [
            "the initramfs is neither systemd-based (dracut, mkosi) nor initramfs-tools: "
            "bcvk cannot give it a writable /etc and /var"
        ]
    # bcvk's virtiofs root needs systemd's root=virtiofs: support in the initrd.
    virtiofs = caps.get("virtiofs") and caps.get("systemd")
    if not virtiofs and not (caps.get("virtio_blk") and caps.get("ext4")):
        return ["the initramfs can mount neither virtiofs nor an ext4 disk on virtio-blk"]
    return []


def judge(info: podman.ImageInfo, facts: TreeFacts, arch: str) -> tuple[list[str], list[str]]:
    """Problems (prevent booting) and warnings for an image; a pure function."""
    problems: list[str] = []
    warnings: list[str] = []
    if kernel := facts.kernel_problem():
        problems.append(kernel)
    if info.architecture and info.architecture != arch:
        problems.append(
            f"image architecture is {info.architecture} but this host is {arch}; "
            "cross-architecture emulation is not supported"
        )
    if facts.init is None:
        problems.append("no init system: /sbin/init is missing")
    if not info.is_bootc:
        warnings.append(f"image has no {podman.BOOTC_LABEL}=1 label")
    if facts.init not in ("systemd", None):
        warnings.append(f"init is {facts.init}, not systemd: SSH key credentials will not apply")
    if not facts.sshd_installed:
        warnings.append("sshd is not installed: `ssh` into VMs of this image will not work")
    elif not facts.sshd_enabled:
        warnings.append("sshd is installed but not enabled at boot")
    caps = facts.initramfs
    if caps:
        problems += initramfs_problems(caps)
        virtiofs = caps.get("virtiofs") and caps.get("systemd")
        if not virtiofs and caps.get("virtio_blk") and caps.get("ext4"):
            warnings.append("initramfs cannot mount virtiofs: ephemeral VMs use --rootfs block")
    elif facts.kernels and facts.kernels[0].kind == "vmlinuz":
        warnings.append("initramfs format not understood; its contents were not checked")
    return problems, warnings


def probe_tree(ref: str) -> TreeFacts:
    """Mount the image, read its facts, and always unmount."""
    with podman.mounted(ref) as root:
        return TreeFacts.from_json(inns.call(probe_json, root))


def inspect(ref: str) -> Report:
    info = podman.local_image(ref)
    facts = probe_tree(ref)
    problems, warnings = judge(info, facts, host_arch())
    return Report(ref, info, facts, problems, warnings)
