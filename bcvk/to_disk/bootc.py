"""`bcvk to-disk --installer bootc`: the image installs itself from a VM.

As upstream: boot an ephemeral VM of the image itself, attach the target as a
virtio disk with serial ``output`` (``/dev/disk/by-id/virtio-output`` in the
guest), share the host's container storage read-only, and run ::

    bootc install to-disk --generic-image --skip-fetch-check \\
        --source-imgref containers-storage:IMAGE [--filesystem FS] \\
        [--root-size SIZE] [--karg=ARG]… [--root-ssh-authorized-keys FILE] \\
        /dev/disk/by-id/virtio-output

in the guest, streaming its output to stderr and failing with its last error
line.  Unlike upstream, bootc runs in the booted guest itself rather than in
a podman container inside it: the guest *is* the image, and
``--source-imgref`` with the shared store (an additional image store) lets
bootc find the image it installs.  The result is then converted like a
native disk.

As upstream, the VM gets swap and a ``/var/tmp`` tmpfs the size of the target
disk (containers/image writes whole layers to files there, and ``/var`` is
in RAM), and it boots ``bcvk-to-disk.target`` (upstream PR #370) rather than
the image's default target, so the image's own services (quadlets touching
``/var/lib/containers``, say) do not run during the install.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from bcvk import ephemeral, run
from bcvk.errors import BcvkError
from bcvk.guest import mounts
from bcvk.guest.initrd import UNITS_DIR, Member
from bcvk.host import podman, ssh
from bcvk.log import logger, step
from bcvk.to_disk import assemble
from bcvk.to_disk.options import (
    Action,
    DiskFormat,
    Options,
    Request,
    Result,
    check_bootc_options,
)
from bcvk.to_disk.output import finish, work_directory
from bcvk.values import MIB, default_vcpus

DEVICE = "/dev/disk/by-id/virtio-output"
STORE_NAME = "hoststorage"
INSTALLER_MEMORY_MIB = 4096
INSTALLER_SSH_TIMEOUT = 900.0
TARGET = "bcvk-to-disk.target"
VAR_TMP = "/var/tmp"

# Wants= on a unit the image lacks is ignored, so one list serves every
# distribution: networkd, NetworkManager or ifupdown; Debian's ssh.service or
# Fedora's sshd.service (socket-activated ones come with basic.target's
# sockets.target); cloud-init for images older than systemd 252, whose SSH key
# arrives in a NoCloud seed; logind, which turns the ACPI power button (how
# bcvk stops the VM) into a poweroff: without it the stop waits out its timeout.
_TARGET_WANTS = (
    "network-online.target",
    "systemd-networkd.service", "systemd-resolved.service", "NetworkManager.service",
    "networking.service",
    "ssh.service", "sshd.service",
    "cloud-init.target",
    "systemd-logind.service",
)  # fmt: skip


def install_argv(image: str, opts: Options, keys_path: str | None) -> list[str]:
    """The command run in the guest (pure)."""
    argv = [
        "bootc", "install", "to-disk", "--generic-image", "--skip-fetch-check",
        "--source-imgref", f"containers-storage:{image}",
    ]  # fmt: skip
    if opts.filesystem is not None:
        argv += ["--filesystem", opts.filesystem.value]
    if opts.root_size is not None:
        argv += ["--root-size", f"{-(-opts.root_size // MIB)}M"]
    argv += [f"--karg={karg}" for karg in opts.kargs]
    argv += opts.bootc.argv()
    if keys_path:
        argv += ["--root-ssh-authorized-keys", keys_path]
    argv.append(DEVICE)
    return argv


def store_share(graph_root: Path) -> mounts.Share:
    """The host's container storage, read-only, where the guest's bootc finds IMAGE."""
    return mounts.named(graph_root, STORE_NAME, readonly=True)


def guest_script(image: str, opts: Options, keys: str | None) -> str:
    """Shell text for the guest: storage env, optional keys file, then bootc."""
    store = store_share(Path("/")).target
    lines = [
        "set -euo pipefail",
        f"export STORAGE_OPTS=additionalimagestore={shlex.quote(store)}",
    ]
    if opts.install_log is not None:
        lines.append(f"export RUST_LOG={shlex.quote(opts.install_log)}")
    keys_path = None
    if keys is not None:
        keys_path = "/run/bcvk-authorized-keys"
        lines.append(f"printf '%s' {shlex.quote(keys)} > {keys_path}")
    lines.append("exec " + shlex.join(install_argv(image, opts, keys_path)))
    return "\n".join(lines)


def failure(returncode: int, output: Sequence[str]) -> BcvkError:
    """The error for a failed install: bootc's own last error line first."""
    errors = [line for line in output if "error" in line.lower()]
    detail = (errors or [line for line in output if line.strip()] or ["no output"])[-1].strip()
    return BcvkError(
        f"bootc install to-disk failed in the installer VM (exit status {returncode}): {detail}",
        hint="its full output is above; try --installer native to build without bootc",
    )


def run_in_guest(target: ssh.Target, script: str) -> tuple[int, list[str]]:
    """Run SCRIPT over SSH, echoing its lines to our stderr, keeping a tail."""
    argv = ssh.argv(target, ["bash", "-c", script], tty=False)
    proc = run.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail: list[str] = []
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip("\n")
        logger.info("  %s", line)
        tail = [*tail[-49:], line]
    return proc.wait(), tail


def target_unit() -> str:
    """``bcvk-to-disk.target``: what the installer VM boots instead of default.target (pure).

    bcvk's own guest services need nothing from it: udev starts them when
    their virtio-serial ports appear.
    """
    var_tmp = mounts.mount_unit_name(VAR_TMP)
    return (
        "[Unit]\n"
        "Description=bcvk: to-disk installer (basic system, network, SSH; not the image's "
        "services)\n"
        "Requires=basic.target\n"
        f"Wants={var_tmp}\n"
        f"Wants={' '.join(_TARGET_WANTS)}\n"
        f"After=basic.target network-online.target {var_tmp}\n"
        "AllowIsolate=yes\n"
    )


def var_tmp_unit(size: int) -> str:
    """A tmpfs on /var/tmp of SIZE bytes, ready before any service starts (pure)."""
    return mounts.early_mount_unit(
        "bcvk: /var/tmp for the image layers bootc unpacks, sized to the disk",
        "tmpfs", VAR_TMP, "tmpfs", f"mode=1777,nosuid,nodev,size={size}",
    )  # fmt: skip


def installer_units(disk_size: int) -> tuple[Member, ...]:
    """The units the installer VM boots with (its ``--systemd-units``)."""
    files = {TARGET: target_unit(), mounts.mount_unit_name(VAR_TMP): var_tmp_unit(disk_size)}
    return (
        Member(UNITS_DIR, stat.S_IFDIR | 0o755),
        *(Member(f"{UNITS_DIR}/{name}", stat.S_IFREG | 0o644, text.encode())
          for name, text in sorted(files.items())),
    )  # fmt: skip


def installer_options(req: Request, target: Path, store: Path) -> ephemeral.Options:
    """The installer VM: the image itself, the target disk, the host's storage."""
    size = req.opts.installer_vm
    return ephemeral.Options(
        image=req.image,
        memory_mib=size.memory_mib or INSTALLER_MEMORY_MIB,
        vcpus=size.vcpus or default_vcpus(),
        kargs=(f"systemd.unit={TARGET}",),
        systemd_units=installer_units(req.disk_size),
        disks=(ephemeral.DiskFile(target, "output", "raw"),),
        binds=(store_share(store),),
        # containers/image writes whole layers to /var/tmp: RAM without these
        add_swap=req.disk_size,
        # an installer VM under TCG on a busy host can take minutes
        ssh_timeout=INSTALLER_SSH_TIMEOUT,
        # its disk and share cannot be restored, and each install is a one-off
        warm=ephemeral.WarmMode.off,
    )


def build(req: Request) -> Result:
    opts = req.opts
    check_bootc_options(opts)
    keys = opts.root_ssh_authorized_keys.read_text() if opts.root_ssh_authorized_keys else None
    with work_directory(req.output) as build:
        work = build.directory
        target = work / "install.raw"
        with open(target, "wb") as f:
            f.truncate(req.disk_size)
        with step(f"Booting an installer VM of {req.image}"):
            store = opts.storage_path or podman.graph_root()
            vm = ephemeral.start(installer_options(req, target, store))
        with vm:
            logger.info("Running bootc install to-disk in the VM…")
            # sshd of a guest still starting can take more than 5 s to greet (TCG)
            status, tail = run_in_guest(
                vm.target(connect_timeout=60), guest_script(req.image, opts, keys)
            )
            vm.stop(graceful=True, timeout=60)
        if status != 0:
            raise failure(status, tail)
        dest = work / f"disk.{req.fmt.value}"
        if req.fmt is DiskFormat.raw:
            os.replace(target, dest)
        else:
            with step(f"Converting to {req.fmt.value}"):
                assemble.convert_raw(
                    target, dest, req.fmt, opts.compress, work, req.disk_size, req.output.stem
                )
            target.unlink()
        size = finish(dest, req.output, req.cache_hash, req.digest, force=req.opts.force)
    seconds = time.monotonic() - req.start
    logger.info("Wrote %s (%s, bootc installer, %.1fs)", req.output, req.fmt.value, seconds)
    return Result(
        req.output, Action.created, req.cache_hash, req.digest, req.fmt, opts.filesystem, size,
        seconds,
    )  # fmt: skip
