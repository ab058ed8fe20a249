"""`bcvk doctor`: what this host has, what is missing, and KVM's real state."""

from __future__ import annotations

import grp
import os
import pwd
import re
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

from bcvk import run
from bcvk.errors import BcvkError
from bcvk.host import accel, firmware, podman, virtiofsd
from bcvk.log import logger

QEMU = "qemu-system-x86_64"

# name → required?  Required tools are the ones every VM command needs.
TOOLS: dict[str, bool] = {
    "podman": True,
    QEMU: True,
    "qemu-img": True,
    "ssh": True,
    "ssh-keygen": True,
    "mkfs.ext4": False,
    "mkfs.xfs": False,
    "mkfs.btrfs": False,
    "mkfs.vfat": False,
    "mcopy": False,
    "sfdisk": False,
    "newuidmap": False,
    "swtpm": False,
    "xorriso": False,
}


@dataclass
class Check:
    name: str
    ok: bool
    required: bool
    detail: str = ""
    path: str | None = None
    version: str | None = None
    packages: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "ok": self.ok,
            "required": self.required,
            "detail": self.detail,
            "path": self.path,
            "version": self.version,
            "packages": dict(self.packages),
        }


def tool_version(path: Path) -> str | None:
    for flag in ("--version", "-V"):
        result = run.run([path, flag], check=False, timeout=10)
        text = (result.stdout or "").strip() or (result.stderr or "").strip()
        if result.returncode == 0 and text:
            return text.splitlines()[0][:120]
    return None


def check_tool(name: str, required: bool) -> Check:
    path = run.find_binary(name, f"/usr/sbin/{name}", f"/sbin/{name}")
    debian, fedora = run.PACKAGES.get(name, (name, name))
    packages = {"debian": debian, "fedora": fedora}
    if path is None:
        return Check(name, False, required, "missing", packages=packages)
    return Check(name, True, required, "found", os.fspath(path), tool_version(path), packages)


def check_virtiofsd() -> Check:
    packages = {"debian": run.PACKAGES["virtiofsd"][0], "fedora": "virtiofsd"}
    try:
        path = virtiofsd.find()
    except BcvkError as exc:
        return Check("virtiofsd", False, False, exc.message, packages=packages)
    if path is None:
        return Check(
            "virtiofsd",
            False,
            False,
            "missing: ephemeral VMs use --rootfs block",
            None,
            None,
            packages,
        )
    return Check("virtiofsd", True, False, "found", os.fspath(path), virtiofsd.version(path))


def pick_probe_image(image: str | None) -> str | None:
    """A bootc image to borrow a kernel from when the host has none."""
    if image is not None:
        return image
    try:
        rows = podman.list_images()
    except BcvkError:
        return None
    names = [n for r in rows for n in (r.get("Names") or [])]
    return names[0] if names else None


def check_accel(image: str | None, refresh: bool) -> Check:
    qemu = run.find_binary(QEMU)
    if qemu is None:
        return Check("acceleration", False, True, "tcg: qemu missing", version="tcg")
    if not refresh and (cached := accel.cached()) is not None:
        return Check(
            "acceleration",
            True,
            True,
            f"{cached.accel}: {cached.reason} (cached)",
            version=cached.accel,
        )
    if accel.host_kernels() or accel.kvm_usable() is not None or podman.rootless():
        verdict = accel.decide(os.fspath(qemu), refresh=refresh)
    else:
        image = pick_probe_image(image)
        if image is None:
            verdict = accel.decide(os.fspath(qemu), refresh=refresh)
        else:
            from bcvk.image import tree as imagetree

            with podman.mounted(image) as root:
                kernels = [k for k in imagetree.find_kernels(root) if k.kind == "vmlinuz"]
                kernel = imagetree.resolve(root, kernels[0].path) if kernels else None
                verdict = accel.decide(os.fspath(qemu), kernel, refresh=refresh)
    return Check(
        "acceleration", True, True, f"{verdict.accel}: {verdict.reason}", version=verdict.accel
    )


def check_ovmf() -> Check:
    found = firmware.find_ovmf()
    packages = {"debian": "ovmf", "fedora": "edk2-ovmf"}
    if found is None:
        return Check(
            "ovmf", False, False, "missing: disk images cannot boot under UEFI", packages=packages
        )
    return Check(
        "ovmf",
        True,
        False,
        f"code {found.code}, vars {found.vars}",
        os.fspath(found.code),
        packages=packages,
    )


def libvirt_sockets() -> list[Path]:
    if os.geteuid() == 0:
        return [Path("/run/libvirt/libvirt-sock"), Path("/run/libvirt/virtqemud-sock")]
    from bcvk.paths import runtime_dir

    base = runtime_dir().parent / "libvirt"
    return [base / "libvirt-sock", base / "virtqemud-sock"]


def check_libvirt() -> Check:
    for path in libvirt_sockets():
        if not path.exists():
            continue
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            try:
                sock.connect(os.fspath(path))
            except OSError as exc:
                logger.debug("%s: %s", path, exc)
                continue
        return Check("libvirt", True, False, f"daemon listening on {path}", os.fspath(path))
    return Check(
        "libvirt",
        False,
        False,
        "no libvirt daemon reachable; start it with `virtlogd -d && libvirtd -d` "
        "(or `systemctl start libvirtd`)",
        packages={"debian": "libvirt-daemon-system", "fedora": "libvirt-daemon-kvm"},
    )


QEMU_CONF = Path("/etc/libvirt/qemu.conf")
KVM_DEVICE = Path("/dev/kvm")


def libvirt_qemu_user(conf_text: str | None) -> str:
    """The user qemu:///system runs QEMU as (qemu.conf ``user =``, else Debian's default)."""
    for line in (conf_text or "").splitlines():
        found = re.match(r'\s*user\s*=\s*"([^"]+)"', line)
        if found:
            return found.group(1).lstrip("+")
    return "libvirt-qemu"


def can_read_write(mode: int, owner: int, group: int, uid: int, gids: set[int]) -> bool:
    """Whether UID with GIDS may open a file with MODE/OWNER/GROUP read-write (no ACLs)."""
    if uid == 0:
        return True
    if uid == owner:
        bits = stat.S_IRUSR | stat.S_IWUSR
    elif group in gids:
        bits = stat.S_IRGRP | stat.S_IWGRP
    else:
        bits = stat.S_IROTH | stat.S_IWOTH
    return mode & bits == bits


def check_libvirt_kvm() -> Check:
    """Can the system daemon's QEMU user open /dev/kvm when root can?

    If root's capability probe sees KVM but the QEMU user cannot open the
    device, libvirt 9 finds its cached QEMU capabilities invalid on every
    lookup ("KVM was enabled when probing …, but it is not available now") and
    re-probes QEMU each time: defining or starting a domain then takes minutes.
    Hosts without udev (containers, CI micro-VMs) leave /dev/kvm in whatever
    group it came with instead of kvm.
    """
    name = "libvirt-kvm-access"
    if os.geteuid() != 0 or not KVM_DEVICE.exists():
        return Check(name, True, False, "not applicable (not root, or no /dev/kvm)")
    try:
        text = QEMU_CONF.read_text() if QEMU_CONF.exists() else None
    except OSError:
        text = None
    user = libvirt_qemu_user(text)
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return Check(name, True, False, f"no user {user}: libvirt's system daemon not installed")
    gids = {entry.pw_gid, *(g.gr_gid for g in grp.getgrall() if user in g.gr_mem)}
    info = KVM_DEVICE.stat()
    if can_read_write(info.st_mode, info.st_uid, info.st_gid, entry.pw_uid, gids):
        return Check(name, True, False, f"{user} can open /dev/kvm")
    try:
        group = grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        group = str(info.st_gid)
    return Check(
        name,
        False,
        False,
        f"libvirt's QEMU user {user} cannot open /dev/kvm (group {group}, mode "
        f"{stat.S_IMODE(info.st_mode):04o}), so libvirt re-probes QEMU on every call and "
        "domains take minutes to define; fix: chgrp kvm /dev/kvm (what udev's rule does)",
        KVM_DEVICE.as_posix(),
    )


def check_rootless() -> Check:
    if os.geteuid() == 0:
        return Check("rootless-podman", True, False, "running as root; rootless not in use")
    if run.find_binary("newuidmap") is None:
        return Check(
            "rootless-podman",
            False,
            False,
            "newuidmap missing",
            packages={"debian": "uidmap", "fedora": "shadow-utils"},
        )
    user = os.environ.get("USER") or str(os.getuid())
    lines = Path("/etc/subuid").read_text().splitlines() if Path("/etc/subuid").exists() else []
    if not any(line.split(":")[0] in (user, str(os.getuid())) for line in lines):
        return Check("rootless-podman", False, False, f"no /etc/subuid range for {user}")
    return Check("rootless-podman", True, False, "newuidmap and a subuid range present")


def run_checks(image: str | None = None, refresh: bool = False) -> list[Check]:
    checks = [check_tool(name, required) for name, required in TOOLS.items()]
    checks.append(check_virtiofsd())
    checks.append(check_ovmf())
    checks.append(check_accel(image, refresh))
    checks.append(check_libvirt())
    checks.append(check_libvirt_kvm())
    checks.append(check_rootless())
    return checks


def healthy(checks: list[Check]) -> bool:
    return all(c.ok for c in checks if c.required)
