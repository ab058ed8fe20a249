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
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bcvk import run
from bcvk.errors import BcvkError, UsageError
from bcvk.host import podman, ssh
from bcvk.log import logger, step
from bcvk.values import MIB

if TYPE_CHECKING:
    from bcvk.to_disk import DiskFormat, Options, Result

DEVICE = "/dev/disk/by-id/virtio-output"
STORE_NAME = "hoststorage"
INSTALLER_MEMORY = "4G"
INSTALLER_SSH_TIMEOUT = 900.0


def available() -> bool:
    """Whether bcvk's ephemeral VM layer (which this installer runs on) is present."""
    try:
        from bcvk import ephemeral
    except ImportError:
        return False
    return hasattr(ephemeral, "start")


def unavailable(image: str) -> BcvkError:
    return BcvkError(
        f"the bootc installer (a VM of {image} running `bootc install to-disk`) is not "
        "available in this bcvk: it needs the ephemeral VM layer",
        hint="use --installer native (no VM, no root), which builds a plain root filesystem",
    )


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
    if keys_path:
        argv += ["--root-ssh-authorized-keys", keys_path]
    argv.append(DEVICE)
    return argv


def guest_script(image: str, opts: Options, keys: str | None) -> str:
    """Shell text for the guest: storage env, optional keys file, then bootc."""
    lines = [
        "set -euo pipefail",
        f"export STORAGE_OPTS=additionalimagestore=/run/virtiofs-mnt-{STORE_NAME}",
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


def check_options(opts: Options) -> None:
    from bcvk.to_disk.layout import PartitionTable

    if opts.partition_table is not PartitionTable.gpt:
        raise UsageError(
            "--partition-table mbr is not supported by the bootc installer",
            hint="bootc always writes GPT; use --installer native for MBR",
        )


def graph_root() -> str:
    return run.output([podman.podman(), "info", "--format", "{{.Store.GraphRoot}}"])


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


def build(
    image: str,
    output: Path,
    opts: Options,
    fmt: DiskFormat,
    disk_size: int,
    cache_hash: str,
    digest: str,
    start: float = 0.0,
) -> Result:
    from bcvk import to_disk

    if not available():
        raise unavailable(image)
    from bcvk import ephemeral

    check_options(opts)
    keys = opts.root_ssh_authorized_keys.read_text() if opts.root_ssh_authorized_keys else None
    with to_disk.work_directory(output) as work:
        target = work / "install.raw"
        with open(target, "wb") as f:
            f.truncate(disk_size)
        store = graph_root()
        with step(f"Booting an installer VM of {image}"):
            vm = ephemeral.start(
                image,
                memory=INSTALLER_MEMORY,
                disks=[f"{target}:output:raw"],
                ro_binds=[f"{store}:{STORE_NAME}"],
                # an installer VM under TCG on a busy host can take minutes
                ssh_timeout=INSTALLER_SSH_TIMEOUT,
            )
        with vm:
            logger.info("Running bootc install to-disk in the VM…")
            status, tail = run_in_guest(vm.target(), guest_script(image, opts, keys))
            vm.stop(graceful=True, timeout=60)
        if status != 0:
            raise failure(status, tail)
        dest = work / f"disk.{fmt.value}"
        if fmt.value == "raw":
            os.replace(target, dest)
        else:
            with step(f"Converting to {fmt.value}"):
                to_disk.convert_raw(target, dest, fmt, opts.compress, work, disk_size, output.stem)
            target.unlink()
        size = to_disk.finish(dest, output, cache_hash, digest)
    seconds = time.monotonic() - start
    logger.info("Wrote %s (%s, bootc installer, %.1fs)", output, fmt.value, seconds)
    return to_disk.Result(
        output, "created", cache_hash, digest, fmt, opts.filesystem, size, seconds
    )
