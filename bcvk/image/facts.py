"""One typed model of what bcvk knows about an image: ``TreeFacts``.

Read once from the mounted tree (``probe``) — by ``images inspect``, the
ephemeral per-image cache and ``to-disk`` alike — and passed on as this
object, or as its JSON across the user-namespace boundary (``bcvk.image.inns``).
"""

from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass, field
from pathlib import Path

from bcvk.image import bootc, initramfs, inns
from bcvk.image.tree import (
    SSH_UNITS,
    Kernel,
    default_target,
    find_kernels,
    has_selinux_policy,
    init_system,
    initramfs_generator,
    parse_os_release,
    read_text,
    resolve,
    systemd_version,
    unit_enabled,
)


@dataclass(frozen=True)
class TreeFacts:
    os_release: dict[str, str]
    kernels: list[Kernel]
    init: str | None
    systemd_version: int | None
    sshd_installed: bool
    sshd_enabled: bool
    has_bootc: bool
    has_cloud_init: bool
    default_target: str | None
    initramfs_generator: str
    initramfs: dict[str, bool] = field(default_factory=dict)
    selinux: bool = False
    # From bootc's install drop-ins (bcvk.image.bootc):
    install_filesystem: str | None = None
    image_kargs: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> TreeFacts:
        raw = dict(data)
        kernels = raw.pop("kernels")
        assert isinstance(kernels, list)
        raw["image_kargs"] = tuple(raw.get("image_kargs") or ())  # type: ignore[arg-type]
        return cls(kernels=[Kernel(**k) for k in kernels], **raw)  # type: ignore[arg-type]

    def kernel_problem(self) -> str | None:
        """Why these kernels cannot boot (none, several, no initramfs), or None."""
        if not self.kernels:
            return (
                "no kernel found under /usr/lib/modules/<version>/ (vmlinuz) "
                "or /boot/EFI/Linux (UKI); this looks like an application container, "
                "not a bootc image"
            )
        if len(self.kernels) > 1:
            found = ", ".join(f"{k.version} ({k.kind})" for k in self.kernels)
            return f"found {len(self.kernels)} kernels, need exactly one: {found}"
        kernel = self.kernels[0]
        if kernel.kind == "vmlinuz" and not kernel.initramfs:
            return f"kernel {kernel.version} has no initramfs.img beside its vmlinuz"
        return None

    def kernel_hint(self) -> str:
        """What the image's author can do about ``kernel_problem()``."""
        if not self.kernels:
            return (
                "a bootc image carries its kernel and initramfs under "
                "/usr/lib/modules/<version>/ (vmlinuz, initramfs.img)"
            )
        if len(self.kernels) > 1:
            return "remove all but one /usr/lib/modules/<version>/ in the image build"
        return "generate the initramfs in the image build (dracut, or update-initramfs)"


def probe(root: Path, arch: str | None = None) -> TreeFacts:
    """Everything bcvk needs to know about the image at ROOT (kargs for ARCH)."""
    text = read_text(root, "/etc/os-release") or read_text(root, "/usr/lib/os-release") or ""
    kernels = find_kernels(root)
    caps: dict[str, bool] = {}
    if len(kernels) == 1 and kernels[0].initramfs:
        kver = kernels[0].version
        builtin = read_text(root, f"/usr/lib/modules/{kver}/modules.builtin") or ""
        image = resolve(root, kernels[0].initramfs)
        if image is not None:
            caps = initramfs.capabilities(image, builtin)
    sshd = resolve(root, "/usr/sbin/sshd") is not None
    return TreeFacts(
        os_release=parse_os_release(text),
        kernels=kernels,
        init=init_system(root),
        systemd_version=systemd_version(root),
        sshd_installed=sshd,
        sshd_enabled=sshd and unit_enabled(root, SSH_UNITS),
        has_bootc=resolve(root, "/usr/bin/bootc") is not None,
        has_cloud_init=resolve(root, "/usr/bin/cloud-init") is not None,
        default_target=default_target(root),
        initramfs_generator=initramfs_generator(root),
        initramfs=caps,
        selinux=has_selinux_policy(root),
        install_filesystem=bootc.install_filesystem(root),
        image_kargs=tuple(bootc.image_kargs(root, arch or platform.machine())),
    )


@inns.entry
def probe_json(root: str) -> dict[str, object]:
    """``probe`` for ``inns.call``."""
    return probe(Path(root)).to_json()
