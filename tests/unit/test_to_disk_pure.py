"""to-disk's pure parts: cache key, formats, BLS entry, debugfs script, copies."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bcvk import ephemeral, to_disk
from bcvk.errors import NotFoundError, UsageError
from bcvk.host import secureboot
from bcvk.host.proc import Identity, boot_id, start_time
from bcvk.image.facts import TreeFacts
from bcvk.image.scan import Loss
from bcvk.to_disk import (
    DiskFormat,
    Options,
    assemble,
    bootloader,
    native,
    options,
    output,
    runs,
)
from bcvk.to_disk import mkfs as diskfs
from bcvk.to_disk.layout import Filesystem, Ids, PartitionTable
from bcvk.to_disk.treecopy import Extra
from bcvk.values import Accel, Firmware, default_vcpus
from tests.conftest import FakeBin

DIGEST = "sha256:" + "ab" * 32
REF = "localhost/bcvk/debian-bootc:12"
GIB = 1024**3


def key(opts: Options, fmt: DiskFormat = DiskFormat.qcow2, size: int = 4 * GIB) -> str:
    return options.cache_hash(options.cache_key(REF, DIGEST, fmt, size, opts))


def test_cache_key_golden(golden: Callable[[str, str], None], tmp_path: Path) -> None:
    keys = tmp_path / "keys.pub"
    keys.write_text("ssh-ed25519 AAAA test\n")
    opts = Options(kargs=("console=ttyS0",), root_ssh_authorized_keys=keys)
    data = options.cache_key(REF, DIGEST, DiskFormat.qcow2, 4 * GIB, opts)
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    text += options.cache_hash(data) + "\n"
    golden("to-disk/cache-key.json", text)


def changed_values(tmp_path: Path) -> dict[str, Any]:
    """A value other than the default for each option that shapes the disk."""
    keys = tmp_path / "k.pub"
    keys.write_text("ssh-ed25519 AAAA changed\n")
    return {
        "filesystem": Filesystem.xfs,
        "root_size": GIB,
        "kargs": ("quiet",),
        "root_ssh_authorized_keys": keys,
        "installer": to_disk.Installer.native,
        "compress": True,
        "partition_table": PartitionTable.mbr,
        "firmware": Firmware.both,
        "bootc": options.BootcInstall(composefs_backend=True),
        "secure_boot_keys": secureboot.Keys(sb_keys(tmp_path), secureboot.DEFAULT_OWNER),
        "guest_services": True,
    }


def sb_keys(tmp_path: Path, name: str = "sb") -> Path:
    """A key directory whose files look like PEM (enough for parsing and the key)."""
    directory = tmp_path / name
    directory.mkdir(exist_ok=True)
    for name in ("PK.crt", "KEK.crt", "db.crt", "db.key"):
        (directory / name).write_text(f"-----BEGIN X-----\n{name}\n-----END X-----\n")
    return directory


def test_every_option_changes_the_key(tmp_path: Path) -> None:
    """Each Options field is in the key unless it is declared run-only or resolved:
    a new field fails here until it is one of the three."""
    fields = {f.name for f in dataclasses.fields(Options)}
    changed = changed_values(tmp_path)
    assert set(changed) == fields - options.RUN_ONLY - options.RESOLVED
    for name, value in changed.items():
        assert key(dataclasses.replace(Options(), **{name: value})) != key(Options()), name
    assert key(Options(kargs=("a", "b"))) != key(Options(kargs=("b", "a")))
    for name in options.RUN_ONLY:
        default = getattr(Options(), name)
        other = "x" if default is None else not default
        unchanged: dict[str, Any] = {name: other}
        assert key(dataclasses.replace(Options(), **unchanged)) == key(Options()), name


def test_key_covers_format_size_digest_and_reference() -> None:
    base = key(Options())
    assert key(Options(), fmt=DiskFormat.raw) != base
    assert key(Options(), size=5 * GIB) != base
    other = options.cache_key("localhost/other:1", DIGEST, DiskFormat.qcow2, 4 * GIB, Options())
    assert options.cache_hash(other) != base
    other = options.cache_key(REF, "sha256:" + "cd" * 32, DiskFormat.qcow2, 4 * GIB, Options())
    assert options.cache_hash(other) != base


def test_key_ignores_dry_run_and_force() -> None:
    assert key(Options(dry_run=True, force=True)) == key(Options())


def test_key_follows_the_content_of_the_keys_file(tmp_path: Path) -> None:
    keys = tmp_path / "k.pub"
    keys.write_text("one\n")
    first = key(Options(root_ssh_authorized_keys=keys))
    keys.write_text("two\n")
    assert key(Options(root_ssh_authorized_keys=keys)) != first


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.qcow2", DiskFormat.qcow2),
        ("a.QCOW2", DiskFormat.qcow2),
        ("a.raw", DiskFormat.raw),
        ("a.img", DiskFormat.raw),
        ("a.vmdk", DiskFormat.vmdk),
        ("a.vhd", DiskFormat.vhd),
        ("a.vhdx", DiskFormat.vhdx),
        ("a.ova", DiskFormat.ova),
        ("a.disk", DiskFormat.raw),
        ("noext", DiskFormat.raw),
    ],
)
def test_format_from_extension(name: str, fmt: DiskFormat) -> None:
    assert options.format_from_path(Path(name)) is fmt


def test_unknown_format_and_filesystem_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="invalid --format 'iso'"):
        to_disk.build(REF, tmp_path / "x", format="iso")
    with pytest.raises(UsageError, match="invalid --filesystem 'zfs'") as exc:
        to_disk.build(REF, tmp_path / "x", filesystem="zfs")
    assert exc.value.hint == "choose one of: ext4, xfs, btrfs"


def test_compress_only_for_qcow2() -> None:
    with pytest.raises(UsageError, match="--compress applies to qcow2 only"):
        options.validate(Options(compress=True), DiskFormat.vhdx)
    options.validate(Options(compress=True), DiskFormat.qcow2)


@pytest.mark.parametrize("firmware", [Firmware.bios, Firmware.both])
def test_bios_is_refused_by_the_native_installer(firmware: Firmware) -> None:
    native = Options(firmware=firmware, installer=to_disk.Installer.native)
    with pytest.raises(UsageError, match="not supported by the native installer") as exc:
        options.validate(native, DiskFormat.raw)
    assert exc.value.hint is not None
    assert "GRUB" in exc.value.hint
    # auto: which installer it is depends on the image, asked once it is read
    options.validate(Options(firmware=firmware), DiskFormat.raw)


@pytest.mark.parametrize(
    ("installer", "has_bootc", "refused"),
    [
        (to_disk.Installer.auto, False, "which --installer auto picks for IMG"),
        (to_disk.Installer.auto, True, None),
        (to_disk.Installer.bootc, True, None),
        (to_disk.Installer.native, True, "not supported by the native installer"),
    ],
)
def test_bios_follows_the_installer_auto_picks(
    installer: to_disk.Installer, has_bootc: bool, refused: str | None
) -> None:
    def check() -> None:
        options.check_picked_firmware(Firmware.bios, installer, has_bootc, "IMG")

    options.check_picked_firmware(Firmware.uefi, installer, has_bootc, "IMG")
    if refused is None:
        check()
        return
    with pytest.raises(UsageError, match=refused) as exc:
        check()
    assert exc.value.hint is not None
    assert "GRUB" in exc.value.hint


def test_missing_keys_file(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        options.validate(Options(root_ssh_authorized_keys=tmp_path / "nope"), DiskFormat.raw)


def test_references_lose_transport_prefixes() -> None:
    assert to_disk.normalize_reference("containers-storage:" + REF) == REF
    with pytest.raises(UsageError):
        to_disk.normalize_reference("bad ref;rm")


def test_output_directory_checks(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        output.check_output_path(tmp_path / "missing" / "x.raw")
    with pytest.raises(UsageError, match="is a directory"):
        output.check_output_path(tmp_path)
    with pytest.raises(UsageError, match="too long"):
        output.check_output_path(tmp_path / ("d" * 250 + ".raw"))
    output.check_output_path(tmp_path / ("d" * 200 + ".raw"))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ boot entry

OS_RELEASE = {"ID": "debian", "PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)"}
ROOT_UUID = "0e6c5f2a-1b3d-4e5f-8a9b-0c1d2e3f4a5b"


def test_bls_entry_golden(golden: Callable[[str, str], None]) -> None:
    options = bootloader.kernel_cmdline(ROOT_UUID, ["console=ttyS0", "quiet"])
    entry = bootloader.make_entry(OS_RELEASE, "6.1.0-56-amd64", options)
    assert entry.entry_id == "debian-6.1.0-56-amd64"
    golden("to-disk/bls-entry.conf", bootloader.render_entry(entry))
    golden("to-disk/loader.conf", bootloader.render_loader_conf(entry.entry_id))


def test_bls_entry_lists_the_guest_services_after_the_images_initrd() -> None:
    entry = bootloader.make_entry(
        OS_RELEASE, "6.1.0-56-amd64", ("rw",), extra_initrds=("/bcvk/guest.img",)
    )
    lines = bootloader.render_entry(entry).splitlines()
    initrds = [line for line in lines if line.startswith("initrd ")]
    assert initrds == ["initrd /debian/6.1.0-56-amd64/initrd", "initrd /bcvk/guest.img"]


def test_cmdline_puts_root_first_and_keeps_karg_order() -> None:
    assert bootloader.kernel_cmdline("U", ["b=1", "a=2"]) == ("root=UUID=U", "rw", "b=1", "a=2")


def test_entry_token_is_filename_safe() -> None:
    assert bootloader.entry_token({"ID": "my os/x"}) == "my_os_x"
    assert bootloader.entry_token({}) == "linux"


def test_stage_esp_layout(tmp_path: Path) -> None:
    for name in ("boot.efi", "kernel", "initrd"):
        (tmp_path / name).write_bytes(name.encode())
    entry = bootloader.make_entry(OS_RELEASE, "6.1", bootloader.kernel_cmdline("U", []))
    files = bootloader.EspFiles(tmp_path / "boot.efi", tmp_path / "kernel", tmp_path / "initrd")
    stage = tmp_path / "esp"
    stage.mkdir()
    bootloader.stage_esp(stage, files, entry, "x86_64")
    found = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file())
    assert found == [
        "EFI/BOOT/BOOTX64.EFI",
        "EFI/systemd/systemd-bootx64.efi",
        "debian/6.1/initrd",
        "debian/6.1/linux",
        "loader/entries/debian-6.1.conf",
        "loader/loader.conf",
    ]
    assert (stage / "debian/6.1/linux").read_bytes() == b"kernel"


# ------------------------------------------------------------------ debugfs


def test_debugfs_script_golden(golden: Callable[[str, str], None]) -> None:
    extras = [
        Extra("/etc/fstab", "file", 0o644, "/w/extras/etc_fstab"),
        Extra("/etc/machine-id", "file", 0o444, "/w/extras/etc_machine-id"),
        Extra("/boot/efi", "dir", 0o700),
        Extra("/root/.ssh", "dir", 0o700),
        Extra("/root/.ssh/authorized_keys", "file", 0o600, "/w/extras/keys"),
    ]
    existing = {
        "/etc/fstab": "other",
        "/etc/machine-id": "missing",
        "/boot/efi": "missing",
        "/root/.ssh": "dir",
    }
    golden("to-disk/debugfs.cmds", diskfs.debugfs_script(extras, existing))


def test_loss_warning_lists_everything_and_is_silent_when_nothing_is_lost() -> None:
    assert diskfs.loss_warning(Filesystem.ext4, Loss()) is None
    text = diskfs.loss_warning(
        Filesystem.xfs,
        Loss(xattrs=["/usr/bin/ping (security.capability)"], hard_links=["/a = /b"]),
    )
    assert text is not None
    assert "/usr/bin/ping (security.capability)" in text
    assert "/a = /b" in text
    many = diskfs.loss_warning(
        Filesystem.btrfs, Loss(device_nodes=[f"/dev/x{i}" for i in range(15)])
    )
    assert many is not None
    assert "… and 5 more" in many


# ------------------------------------------------------------------ file copies


def test_copy_sparse_keeps_holes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with open(src, "wb") as f:
        f.truncate(64 * 1024 * 1024)
        f.seek(10 * 1024 * 1024)
        f.write(b"hello")
        f.seek(40 * 1024 * 1024)
        f.write(b"world")
    dst = tmp_path / "dst"
    with open(dst, "wb") as f:
        f.truncate(128 * 1024 * 1024)
    assemble.copy_sparse(src, dst, 1024 * 1024)
    data = dst.read_bytes()
    assert data[11 * 1024 * 1024 : 11 * 1024 * 1024 + 5] == b"hello"
    assert data[41 * 1024 * 1024 : 41 * 1024 * 1024 + 5] == b"world"
    assert data.count(b"\0") == len(data) - 10
    assert os.stat(dst).st_blocks * 512 < 4 * 1024 * 1024


def test_slice_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"a" * 10 + b"\0" * (2 << 20) + b"tail")
    dst = tmp_path / "dst"
    assemble.slice_file(src, dst, 5, (2 << 20) + 9)
    assert dst.read_bytes() == b"a" * 5 + b"\0" * (2 << 20) + b"tail"


def test_xattr_probe_and_creator_marker(tmp_path: Path) -> None:
    assert output.xattrs_supported(tmp_path) is None
    assert list(tmp_path.iterdir()) == []
    f = tmp_path / "f"
    f.write_text("x")
    assert not output.created_by_bcvk(f)
    os.setxattr(f, output.XATTR_HASH, b"sha256:1")
    assert output.created_by_bcvk(f)
    assert output.read_xattr(f, output.XATTR_HASH) == "sha256:1"


def test_no_space_detection() -> None:
    from bcvk.errors import CommandError

    assert output.no_space(OSError(28, "No space left on device"))
    assert output.no_space(
        CommandError(["mkfs.ext4"], 1, "__populate_fs: Could not allocate block in ext2 filesystem")
    )
    assert not output.no_space(CommandError(["mkfs.ext4"], 1, "bad option"))


def test_missing_tool_names_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from bcvk import run
    from bcvk.errors import ToolMissingError

    real = run.find_binary

    def find(name: str, *fallbacks: str | Path) -> Path | None:
        return None if name == "mkfs.xfs" else real(name, *fallbacks)

    monkeypatch.setattr(run, "find_binary", find)
    with pytest.raises(ToolMissingError, match="mkfs.xfs not found") as exc:
        native.preflight(Filesystem.xfs, DiskFormat.qcow2)
    assert exc.value.hint is not None
    assert "apt-get install xfsprogs" in exc.value.hint
    native.preflight(Filesystem.ext4, DiskFormat.qcow2)


def test_admin_tools_are_found_outside_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from bcvk import run

    monkeypatch.setenv("PATH", "/nonexistent")
    assert run.require("mkfs.ext4", *run.sbin("mkfs.ext4")) == Path("/usr/sbin/mkfs.ext4")


# ------------------------------------------------------------------ bootc installer


def test_bootc_install_argv_golden(golden: Callable[[str, str], None]) -> None:
    from bcvk.to_disk import bootc as to_disk_bootc

    opts = Options(
        filesystem=Filesystem.xfs,
        root_size=10 * GIB,
        kargs=("console=ttyS0", "a b"),
        installer=to_disk.Installer.bootc,
        install_log="bootc_lib=debug,info",
        bootc=options.BootcInstall(
            target_transport="containers-storage",
            composefs_backend=True,
            bootloader=options.Bootloader.systemd,
            allow_missing_fsverity=True,
        ),
    )
    script = to_disk_bootc.guest_script(REF, opts, "ssh-ed25519 AAAA it's me\n")
    golden("to-disk/bootc-install.sh", script + "\n")
    argv = to_disk_bootc.install_argv(REF, Options(), None)
    assert argv == [
        "bootc", "install", "to-disk", "--generic-image", "--skip-fetch-check",
        "--source-imgref", f"containers-storage:{REF}", "/dev/disk/by-id/virtio-output",
    ]  # fmt: skip


def test_each_bootc_install_flag_is_in_the_key_and_old_keys_hold() -> None:
    each = (
        options.BootcInstall(target_transport="oci"),
        options.BootcInstall(composefs_backend=True),
        options.BootcInstall(bootloader=options.Bootloader.none),
        options.BootcInstall(allow_missing_fsverity=True),
    )
    keys = {key(Options(bootc=b)) for b in each}
    assert len(keys) == 4
    assert key(Options()) not in keys
    # Unset, the key has no bootc_install entry: disks built before these flags are reused.
    assert "bootc_install" not in options.cache_key(REF, DIGEST, DiskFormat.raw, GIB, Options())


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"target_transport": "Registry!"}, "invalid --target-transport"),
        ({"bootloader": "lilo"}, "invalid --bootloader"),
        ({"installer_memory": "lots"}, "invalid --memory"),
        ({"installer_vcpus": "0"}, "invalid --vcpus"),
        ({"installer_itype": "u9.huge"}, "unknown instance type"),
        ({"installer": "native", "composefs_backend": True}, "--composefs-backend: for the bootc"),
        ({"installer": "native", "installer_memory": "2G"}, "--memory: for the bootc"),
    ],
)
def test_bootc_installer_flags_are_checked_up_front(values: dict[str, Any], message: str) -> None:
    def check() -> None:
        options.validate(to_disk.make_options(**values), DiskFormat.raw)

    with pytest.raises(UsageError) as caught:
        check()
    assert message in caught.value.message
    assert caught.value.hint


def test_installer_vm_size_from_the_flags(tmp_path: Path) -> None:
    from bcvk.to_disk import bootc

    req = options.Request(REF, "a" * 64, DIGEST, 1, tmp_path / "o.raw",
                          to_disk.make_options(installer_itype="u1.small"),
                          DiskFormat.raw, GIB, "h")  # fmt: skip
    vm = bootc.installer_options(req, tmp_path / "t.raw", tmp_path)
    assert (vm.memory_mib, vm.vcpus) == (2048, 1)
    req = dataclasses.replace(req, opts=to_disk.make_options(installer_memory="6G"))
    vm = bootc.installer_options(req, tmp_path / "t.raw", tmp_path)
    assert (vm.memory_mib, vm.vcpus) == (6144, default_vcpus())


def test_installer_vm_boots_a_minimal_target_with_swap_and_var_tmp(
    tmp_path: Path, golden: Callable[[str, str], None]
) -> None:
    from bcvk.to_disk import bootc

    req = options.Request(REF, "a" * 64, DIGEST, 1, tmp_path / "o.raw", Options(),
                          DiskFormat.raw, 4 * GIB, "h")  # fmt: skip
    vm = bootc.installer_options(req, tmp_path / "t.raw", tmp_path)
    assert vm.kargs == ("systemd.unit=bcvk-to-disk.target",)
    assert vm.add_swap == 4 * GIB
    units = {m.path: m.data.decode() for m in vm.systemd_units}
    assert sorted(units) == ["bcvk/units", "bcvk/units/bcvk-to-disk.target",
                             "bcvk/units/var-tmp.mount"]  # fmt: skip
    golden("to-disk/bcvk-to-disk.target", units["bcvk/units/bcvk-to-disk.target"])
    golden("to-disk/var-tmp.mount", units["bcvk/units/var-tmp.mount"])
    assert "size=4294967296\n" in units["bcvk/units/var-tmp.mount"]


def test_bootc_installer_takes_paths_with_colons_as_they_are(tmp_path: Path) -> None:
    """The installer VM gets typed disks and shares: no path is parsed as FILE:NAME:FMT."""
    from bcvk.host import qemu
    from bcvk.to_disk import bootc

    output = tmp_path / "out:v1.raw"
    req = options.Request(REF, "a" * 64, DIGEST, 1, output, Options(), DiskFormat.raw, GIB, "h")
    target = tmp_path / f".{output.name}.bcvk-1a2b3c4d" / "install.raw"
    store = tmp_path / "graph:root"
    vm = bootc.installer_options(req, target, store)
    assert [(d.path, d.name, d.format) for d in vm.disks] == [(target, "output", "raw")]
    assert [(s.source, s.readonly) for s in vm.binds] == [(str(store), True)]
    drive = qemu.Drive(str(target), "raw", "output")
    spec = qemu.QemuSpec("qemu", Accel.tcg, 1024, 1, "k", None, "", 2222, drives=(drive,))
    assert f"file={target},format=raw" in " ".join(qemu.argv(spec))


def test_bootc_failure_names_bootcs_error() -> None:
    from bcvk.to_disk import bootc as to_disk_bootc

    err = to_disk_bootc.failure(
        1, ["Installing image", "error: Installing to disk: no space", "", "cleanup"]
    )
    assert "exit status 1" in str(err)
    assert str(err).endswith("error: Installing to disk: no space")
    assert "no output" in str(to_disk_bootc.failure(2, []))


def test_bootc_refuses_mbr() -> None:

    with pytest.raises(UsageError, match="mbr"):
        options.check_bootc_options(Options(partition_table=PartitionTable.mbr))


# ------------------------------------------------------------------ extras


def _tree(tmp_path: Path, *, selinux: bool = False, **existing: str) -> native.Tree:
    base = {
        "/etc": "dir", "/etc/fstab": "other", "/etc/machine-id": "other", "/root": "dir",
        "/root/.ssh": "missing", "/root/.ssh/authorized_keys": "missing", "/boot": "dir",
        "/boot/efi": "missing", "/.autorelabel": "missing",
    }  # fmt: skip
    base.update({k.replace("_", "/"): v for k, v in existing.items()})
    facts = TreeFacts(
        os_release={}, kernels=[], init="systemd", systemd_version=252, sshd_installed=True,
        sshd_enabled=True, has_bootc=False, has_cloud_init=False, default_target=None,
        initramfs_generator="dracut", selinux=selinux,
    )  # fmt: skip
    return native.Tree(tmp_path, facts, native.Located(None, None, None, base))


def _plan(filesystem: Filesystem, ids: Ids) -> native.Plan:
    from bcvk.to_disk.layout import compute_layout

    layout = compute_layout(4 * GIB, content_bytes=1, filesystem=filesystem, ids=ids)
    return native.Plan(filesystem, layout, ids, ())


def test_extras_without_keys_or_selinux(tmp_path: Path) -> None:
    ids = Ids.generate()
    extras = native.extras(tmp_path, _plan(Filesystem.ext4, ids), Options(), _tree(tmp_path))
    assert [(e.path, e.kind, oct(e.mode)) for e in extras] == [
        ("/etc/fstab", "file", "0o644"),
        ("/etc/machine-id", "file", "0o444"),
        ("/boot/efi", "dir", "0o700"),
    ]
    assert Path(extras[1].source or "").read_text() == ""
    assert f"UUID={ids.root_fs} / ext4" in Path(extras[0].source or "").read_text()


def test_extras_with_keys_and_selinux_relabel(tmp_path: Path) -> None:
    keys = tmp_path / "k.pub"
    keys.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBcvkStandIn x\n")
    work = tmp_path / "work"
    work.mkdir()
    extras = native.extras(
        work,
        _plan(Filesystem.xfs, Ids.generate()),
        Options(root_ssh_authorized_keys=keys),
        _tree(tmp_path, selinux=True),
    )
    paths = [e.path for e in extras]
    assert paths[-3:] == ["/root/.ssh", "/root/.ssh/authorized_keys", "/.autorelabel"]
    key_extra = extras[-2]
    assert key_extra.mode == 0o600
    assert Path(key_extra.source or "").read_text() == keys.read_text()


def test_stage_esp_for_a_uki(tmp_path: Path) -> None:
    (tmp_path / "boot.efi").write_bytes(b"sd-boot")
    (tmp_path / "uki").write_bytes(b"uki")
    files = bootloader.EspFiles(tmp_path / "boot.efi", tmp_path / "uki", None, uki=True)
    stage = tmp_path / "esp"
    stage.mkdir()
    bootloader.stage_esp(stage, files, None, "x86_64", uki_name="6.9.efi")
    assert (stage / "EFI" / "Linux" / "6.9.efi").read_bytes() == b"uki"
    assert list((stage / "loader" / "entries").iterdir()) == []
    assert "default" not in (stage / "loader" / "loader.conf").read_text()


def test_xattr_probe_explains_an_unsupporting_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOTSUP, "Operation not supported")

    monkeypatch.setattr(os, "setxattr", refuse)
    assert output.xattrs_supported(tmp_path) == "Operation not supported"
    assert list(tmp_path.iterdir()) == []


def _work_dir(parent: Path, owner: runs.Owner | str | None, name: str = ".x.qcow2") -> Path:
    work = parent / f"{name}.bcvk-{len(list(parent.iterdir())):08x}"
    work.mkdir()
    (work / "root.img").write_bytes(b"partial")
    if isinstance(owner, runs.Owner):
        owner.write(work)
    elif owner is not None:
        (work / runs.OWNER).write_text(owner)
    return work


def _dead_process() -> Identity:
    """The identity of a process that has exited (and been waited for)."""
    child = subprocess.Popen(["sleep", "0.01"])
    started = start_time(child.pid)
    child.wait()
    assert started is not None
    return Identity(child.pid, started, boot_id())


def test_sweep_removes_only_work_of_dead_runs_on_this_host(tmp_path: Path) -> None:
    import platform

    dead = _dead_process()
    here = platform.node()
    gone = _work_dir(tmp_path, runs.Owner("t1", here, dead))
    alive = _work_dir(tmp_path, runs.Owner("t2", here, Identity.current()))
    elsewhere = _work_dir(tmp_path, runs.Owner("t3", "another-host", dead))
    # A recycled pid: same number, another start time, is still "gone".
    recycled = Identity(os.getpid(), Identity.current().started + 1, boot_id())
    reused = _work_dir(tmp_path, runs.Owner("t4", here, recycled))
    unmarked = _work_dir(tmp_path, None)
    garbled = _work_dir(tmp_path, "nonsense")
    other_output = _work_dir(tmp_path, runs.Owner("t5", here, dead), name=".y.qcow2")

    assert sorted(output.sweep_stale_work(tmp_path / "x.qcow2")) == sorted([gone, reused])
    for kept in (alive, elsewhere, unmarked, garbled, other_output):
        assert kept.is_dir()


def test_a_killed_build_is_undone_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_bin: FakeBin
) -> None:
    """The record a SIGKILLed build left: its work dir goes, its image mount is dropped."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    fake_bin.add("podman", "true")
    monkeypatch.setattr(ephemeral, "ps", list)
    work = tmp_path / ".out.raw.bcvk-1"
    with runs.recorded(work) as run:
        run.mount, run.mount_state = "sha256-image", "mounted"
        run.save()
        # What SIGKILL leaves: the record and the directory, owned by a dead process.
        killed = dataclasses.replace(run, process=_dead_process())
        killed.save()
        runs.Owner(run.token, platform.node(), killed.process).write(work)
        foreign = tmp_path / ".other.raw.bcvk-2"
        foreign.mkdir()  # no owner file: not this record's to remove
        live = runs.Run("live", Identity.current(), str(tmp_path / "busy"))
        live.save()
        assert runs.reap() == [str(work)]
        assert not work.exists()
        assert foreign.is_dir()
        assert live.path.exists()  # a live build is left alone
        assert not run.path.exists()
    assert [c[-1] for c in fake_bin.calls("podman")] == ["sha256-image"]
    live.path.unlink()
    # Nothing of the runs is left in the runtime dir.
    assert sorted(p.name for p in (tmp_path / "bcvk").iterdir()) == []


def test_install_log_is_validated_and_kept_out_of_the_cache_key() -> None:
    with pytest.raises(UsageError, match="invalid --install-log filter"):
        options.validate(Options(install_log="debug; rm -rf /"), DiskFormat.raw)
    options.validate(Options(install_log="bootc_lib=trace,info"), DiskFormat.raw)
    assert key(Options(install_log="debug")) == key(Options())


def test_secure_boot_keys_are_checked_up_front(tmp_path: Path) -> None:
    directory = sb_keys(tmp_path)
    keys = secureboot.load_keys(directory)
    assert (keys.db_key, keys.owner) == (directory / "db.key", secureboot.DEFAULT_OWNER)
    first = key(Options(secure_boot_keys=keys))
    (directory / "db.crt").write_text("-----BEGIN X-----\nanother\n-----END X-----\n")
    assert key(Options(secure_boot_keys=keys)) != first  # another db: another disk
    assert "secure_boot_db" not in options.cache_key(REF, DIGEST, DiskFormat.raw, GIB, Options())
    (directory / "GUID.txt").write_text("3f2504e0-4f89-11d3-9a0c-0305e82c3301\n")
    assert secureboot.load_keys(directory).owner == "3f2504e0-4f89-11d3-9a0c-0305e82c3301"
    for name, content, message in (
        ("GUID.txt", b"nope", "GUID.txt is not a GUID"),
        ("KEK.crt", b"\x30\x82", "KEK.crt is not a PEM file"),
        ("db.key", None, "db.key: No such file or directory"),
    ):
        case = sb_keys(tmp_path, name)
        if content is None:
            (case / name).unlink()
        else:
            (case / name).write_bytes(content)
        with pytest.raises((UsageError, NotFoundError), match=message):
            secureboot.load_keys(case)
    with pytest.raises(NotFoundError, match="no such directory"):
        secureboot.load_keys(tmp_path / "missing")


def test_the_bootc_installer_refuses_secure_boot_keys(tmp_path: Path) -> None:
    opts = to_disk.make_options(installer="bootc", secure_boot_keys=sb_keys(tmp_path))
    with pytest.raises(UsageError, match="the bootc installer writes its own boot chain"):
        options.validate(opts, DiskFormat.raw)


def test_the_efi_binaries_a_signed_esp_has(tmp_path: Path) -> None:
    from bcvk.to_disk import bootloader

    entry = bootloader.make_entry({"ID": "debian"}, "6.1.0-1-amd64", ("root=UUID=x",))
    paths = bootloader.efi_binaries(tmp_path, entry, "x86_64")
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "EFI/BOOT/BOOTX64.EFI", "EFI/systemd/systemd-bootx64.efi", entry.linux.lstrip("/"),
    ]  # fmt: skip
    uki = bootloader.efi_binaries(tmp_path, None, "x86_64", "6.1.efi")
    assert uki[-1] == tmp_path / "EFI" / "Linux" / "6.1.efi"
