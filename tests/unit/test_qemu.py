"""QEMU argv and kernel command line: pure functions checked against golden files."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bcvk.host import qemu
from bcvk.host.qemu import Drive, NinePShare, QemuSpec, RootfsKind, VirtiofsShare
from bcvk.values import Accel, PortForward


def render(argv: list[str]) -> str:
    """One argument per line, an option and its value on the same line."""
    lines: list[str] = [argv[0]]
    i = 1
    while i < len(argv):
        word = argv[i]
        if word.startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            lines.append(f"{word} {argv[i + 1]}")
            i += 2
        else:
            lines.append(word)
            i += 1
    return "\n".join(lines) + "\n"


BASE = QemuSpec(
    binary="qemu-system-x86_64",
    accel=Accel.tcg,
    memory_mib=2048,
    vcpus=2,
    kernel="/cache/vmlinuz",
    initrd="/cache/initramfs.img",
    cmdline=" ".join(qemu.kernel_args(rootfs=RootfsKind.block, block_label="bcvk-0123456789a")),
    ssh_port=40022,
    console_log="/run/vm/console.log",
    qmp_fd=5,
    name="demo",
    drives=(Drive("/cache/rootfs.ext4", "raw", "bcvk-rootfs", readonly=True),),
    smbios=("io.systemd.credential.binary:tmpfiles.extra=ZCAvcm9vdA==",),
)


def test_block_vm_argv(golden: Callable[[str, str], None]) -> None:
    golden("ephemeral/qemu-block.argv", render(qemu.argv(BASE)))


def test_virtiofs_vm_with_everything(golden: Callable[[str, str], None]) -> None:
    from dataclasses import replace

    spec = replace(
        BASE,
        accel=Accel.kvm,
        cmdline=" ".join(qemu.kernel_args(rootfs=RootfsKind.virtiofs, extra=("quiet",))),
        virtiofs=(
            VirtiofsShare("rootfs", "/run/vm/fs0.sock", fd=6),
            VirtiofsShare("mount_data", "/run/vm/fs1.sock"),
        ),
        forwards=(PortForward(8080, 80), PortForward(5432, 5432)),
        drives=(
            Drive("/srv/out.qcow2", "qcow2", "output"),
            Drive("/var/tmp/swap,1", "raw", "swap"),
        ),
        console_on_stdio=True,
    )
    golden("ephemeral/qemu-virtiofs.argv", render(qemu.argv(spec)))


def test_ninep_shares_and_no_console_log() -> None:
    from dataclasses import replace

    spec = replace(
        BASE,
        console_log=None,
        qmp_fd=None,
        qmp_socket="/run/vm/qmp.sock",
        ninep=(NinePShare("mount_src", "/home/me/src", readonly=True),),
    )
    argv = qemu.argv(spec)
    assert (
        "local,id=fs9p0,path=/home/me/src,mount_tag=mount_src,security_model=none,readonly=on"
        in argv
    )
    assert "null,id=serial0" in argv
    assert "socket,id=qmp,path=/run/vm/qmp.sock,server=on,wait=off" in argv


def test_forwards_only_on_loopback() -> None:
    from dataclasses import replace

    argv = qemu.argv(replace(BASE, forwards=(PortForward(2000, 3000),)))
    netdev = argv[argv.index("-netdev") + 1]
    for rule in netdev.split(",")[2:]:
        assert rule.startswith("hostfwd=tcp:127.0.0.1:"), rule


def test_commas_in_paths_are_escaped() -> None:
    assert qemu.escape_option("a,b,,c") == "a,,b,,,,c"


def test_kernel_args_user_kargs_come_last() -> None:
    args = qemu.kernel_args(
        rootfs=RootfsKind.virtiofs, selinux_off=True, extra=("systemd.unit=poweroff.target",)
    )
    assert args[0] == "console=ttyS0"
    assert "root=virtiofs:rootfs" in args
    # The layout comes from bcvk's initramfs archive, not a volatile root.
    assert not any(a.startswith("systemd.volatile") for a in args)
    assert "selinux=0" in args
    assert args[-1] == "systemd.unit=poweroff.target"


def test_block_kernel_args_need_a_label() -> None:
    with pytest.raises(ValueError, match="label"):
        qemu.kernel_args(rootfs=RootfsKind.block)
    args = qemu.kernel_args(rootfs=RootfsKind.block, block_label="bcvk-x")
    assert "root=LABEL=bcvk-x" in args
    assert "ro" in args


def test_restored_vm_argv(golden: Callable[[str, str], None]) -> None:
    """A warm VM: the control port, a VM generation ID, and the state to load."""
    from dataclasses import replace

    spec = replace(BASE, smbios=(), control_fd=8, vmgenid=True, incoming_fd=3)
    golden("ephemeral/qemu-restore.argv", render(qemu.argv(spec)))
