"""`bcvk to-disk` against the real demo image: formats, content, cache, faults.

Disks are built as root here (the rootless build and the boots live in
test_to_disk_boot.py).  Filesystems are checked with their own tools and
by reading the result through a read-only loop mount (the test runs as root;
bcvk itself never mounts anything).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bcvk.to_disk import output, ovf
from tests.conftest import DEMO_IMAGE, bcvk, podman_mounts

MIB = 1024 * 1024
ESP_START, ROOT_START = 1 * MIB, 513 * MIB


def run(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=check)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def extract(disk: Path, start: int, dest: Path, length: int | None = None) -> Path:
    """Copy one partition out of a raw disk (sparse)."""
    count = [] if length is None else [f"count={length // MIB}"]
    run("dd", f"if={disk}", f"of={dest}", "bs=1M", f"skip={start // MIB}", *count,
        "conv=sparse", "status=none")  # fmt: skip
    return dest


@contextlib.contextmanager
def loop_mounted(image: Path, mountpoint: Path) -> Iterator[Path]:
    mountpoint.mkdir(exist_ok=True)
    run("mount", "-o", "loop,ro", image, mountpoint)
    try:
        yield mountpoint
    finally:
        run("umount", mountpoint)


@pytest.fixture
def keyfile(tmp_path: Path) -> Path:
    key = tmp_path / "keys.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBcvkTestKeyOnlyForTests bcvk-test\n")
    return key


@pytest.fixture
def no_mount_leaks() -> Iterator[None]:
    """No image mount left behind (bcvk starts no VM here, so no process check)."""
    before = set(podman_mounts())
    yield
    assert set(podman_mounts()) <= before, "image mounts left behind"


def xattrs(path: Path) -> dict[str, str]:
    return {n: os.getxattr(path, n).decode() for n in os.listxattr(path)}


# ------------------------------------------------------------------ cache


def test_qcow2_build_reuse_dry_run_and_regenerate(
    demo_image: str, tmp_path: Path, no_mount_leaks: None
) -> None:
    out = tmp_path / "out.qcow2"
    first = bcvk("to-disk", demo_image, str(out), "--karg", "console=ttyS0", check=True)
    assert "Populating the ext4 root filesystem" in first.stderr
    assert "Converting to qcow2" in first.stderr
    assert first.stdout == ""
    info = json.loads(run("qemu-img", "info", "--output=json", out).stdout)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 4 * 1024**3
    marks = xattrs(out)
    assert marks[output.XATTR_HASH].startswith("sha256:")
    assert marks[output.XATTR_DIGEST].startswith("sha256:")
    inode = out.stat().st_ino
    assert leftovers(tmp_path) == ["out.qcow2"]

    again = bcvk("to-disk", demo_image, str(out), "--karg", "console=ttyS0", check=True)
    assert f"Reusing existing cached disk image at: {out}" in again.stderr
    assert out.stat().st_ino == inode

    dry = bcvk("to-disk", demo_image, str(out), "--karg", "console=ttyS0", "--dry-run", check=True)
    assert dry.stdout == "would-reuse\n"
    dry = bcvk("to-disk", demo_image, str(out), "--karg", "quiet", "--dry-run", check=True)
    assert dry.stdout == "would-regenerate\n"
    assert out.stat().st_ino == inode
    assert xattrs(out) == marks

    changed = bcvk("to-disk", demo_image, str(out), "--karg", "quiet", check=True)
    assert "Reusing" not in changed.stderr
    assert out.stat().st_ino != inode
    assert xattrs(out)[output.XATTR_HASH] != marks[output.XATTR_HASH]
    assert leftovers(tmp_path) == ["out.qcow2"]


# ------------------------------------------------------------------ formats


@pytest.mark.parametrize(
    ("name", "extra", "driver"),
    [
        ("disk.qcow2", ["--compress"], "qcow2"),
        ("disk.vmdk", [], "vmdk"),
        ("disk.vhd", [], "vpc"),
        ("disk.vhdx", [], "vhdx"),
        ("disk.img", ["--format", "qcow2"], "qcow2"),
    ],
)
def test_formats(demo_image: str, tmp_path: Path, name: str, extra: list[str], driver: str) -> None:
    out = tmp_path / name
    bcvk("to-disk", demo_image, str(out), *extra, check=True)
    info = json.loads(run("qemu-img", "info", "--output=json", out).stdout)
    assert info["format"] == driver
    assert info["virtual-size"] >= 4 * 1024**3
    if driver == "vmdk":
        assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    if driver in ("qcow2", "vhdx"):
        assert run("qemu-img", "check", out).returncode == 0
    # the partition table survives the conversion
    raw = tmp_path / "back.raw"
    run("qemu-img", "convert", "-O", "raw", out, raw)
    table = json.loads(run("sfdisk", "--json", raw).stdout)["partitiontable"]
    assert [p["type"] for p in table["partitions"]] == [
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
    ]


def test_ova_is_an_ovf_then_a_stream_vmdk(demo_image: str, tmp_path: Path) -> None:
    out = tmp_path / "appliance.ova"
    bcvk("to-disk", demo_image, str(out), check=True)
    with tarfile.open(out) as tar:
        names = tar.getnames()
        assert names == ["appliance.ovf", "appliance-disk1.vmdk", "appliance.mf"]
        assert tar.getmember("appliance.ovf").isfile()
        descriptor = tar.extractfile("appliance.ovf").read().decode()  # type: ignore[union-attr]
        manifest = tar.extractfile("appliance.mf").read().decode()  # type: ignore[union-attr]
        vmdk = tmp_path / "appliance-disk1.vmdk"
        vmdk.write_bytes(tar.extractfile("appliance-disk1.vmdk").read())  # type: ignore[union-attr]
    facts = ovf.parse(descriptor)
    assert facts["disk_file"] == "appliance-disk1.vmdk"
    assert facts["disk_file_size"] == vmdk.stat().st_size
    assert facts["disk_capacity"] == 4 * 1024**3
    assert facts["firmware"] == "efi"
    assert facts["disk_format"] == ovf.VMDK_STREAM
    info = json.loads(run("qemu-img", "info", "--output=json", vmdk).stdout)
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    assert manifest == ovf.manifest(
        [("appliance.ovf", descriptor.encode()), ("appliance-disk1.vmdk", vmdk)]
    )


# ------------------------------------------------------------------ content


def test_raw_ext4_content(demo_image: str, tmp_path: Path, keyfile: Path) -> None:
    out = tmp_path / "disk.raw"
    bcvk("to-disk", demo_image, str(out), "--karg", "console=ttyS0", "--karg", "quiet",
         "--root-ssh-authorized-keys", str(keyfile), check=True)  # fmt: skip
    st = out.stat()
    assert st.st_size == 4 * 1024**3
    assert st.st_blocks * 512 < st.st_size // 4, "raw output must be sparse"
    root = extract(out, ROOT_START, tmp_path / "root.img")
    esp = extract(out, ESP_START, tmp_path / "esp.img", 512 * MIB)
    assert run("e2fsck", "-fn", root, check=False).returncode == 0
    uuid = run("blkid", "-p", "-o", "value", "-s", "UUID", root).stdout.strip()
    esp_uuid = run("blkid", "-p", "-o", "value", "-s", "UUID", esp).stdout.strip()
    assert run("blkid", "-p", "-o", "value", "-s", "TYPE", esp).stdout.strip() == "vfat"

    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    entries = subprocess.run(["mdir", "-b", "-i", esp, "::/loader/entries"], capture_output=True,
                             text=True, env=env, check=True).stdout.split()  # fmt: skip
    assert len(entries) == 1
    entry = subprocess.run(["mtype", "-i", esp, entries[0]], capture_output=True, text=True,
                           env=env, check=True).stdout  # fmt: skip
    assert f"options root=UUID={uuid} rw console=ttyS0 quiet" in entry
    for path in ("::/EFI/BOOT/BOOTX64.EFI", "::/EFI/systemd/systemd-bootx64.efi"):
        assert (
            subprocess.run(["mdir", "-i", esp, path], capture_output=True, env=env).returncode == 0
        )

    with loop_mounted(root, tmp_path / "mnt") as mnt:
        fstab = (mnt / "etc" / "fstab").read_text()
        assert f"UUID={uuid} / ext4 defaults 0 1" in fstab
        assert f"UUID={esp_uuid} /boot/efi vfat" in fstab
        assert (mnt / "etc" / "machine-id").read_text() == ""
        keys = mnt / "root" / ".ssh" / "authorized_keys"
        assert keys.read_text() == keyfile.read_text()
        assert stat.S_IMODE(keys.stat().st_mode) == 0o600
        assert stat.S_IMODE((mnt / "root" / ".ssh").stat().st_mode) == 0o700
        assert (mnt / "boot" / "efi").is_dir()
        # what ext4 -d must keep: sticky, setuid, devices, hard links, owners
        assert stat.S_IMODE((mnt / "tmp").stat().st_mode) == 0o1777
        assert (mnt / "usr" / "bin" / "passwd").stat().st_mode & stat.S_ISUID
        chage = (mnt / "usr" / "bin" / "chage").stat()
        assert chage.st_mode & stat.S_ISGID
        assert chage.st_gid == 42  # group shadow
        null = (mnt / "dev" / "null").lstat()
        assert stat.S_ISCHR(null.st_mode)
        assert (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
        perl = mnt / "usr" / "bin" / "perl"
        assert perl.stat().st_ino == (mnt / "usr" / "bin" / "perl5.36.0").stat().st_ino
        assert os.listxattr(mnt / "var" / "log" / "journal")  # its default ACL
    # the image itself is untouched
    mounted = run("podman", "image", "mount", DEMO_IMAGE).stdout.strip()
    try:
        assert not (Path(mounted) / "root" / ".ssh" / "authorized_keys").exists()
        assert "UUID=" not in (Path(mounted) / "etc" / "fstab").read_text()
    finally:
        run("podman", "image", "unmount", DEMO_IMAGE)


def make_sb_keys(directory: Path) -> Path:
    """PK, KEK and db: self-signed certificates with their keys, as a user makes them."""
    directory.mkdir()
    for name in ("PK", "KEK", "db"):
        run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-x509", "-sha256", "-days", "30",
            "-subj", f"/CN=bcvk test {name}/", "-keyout", directory / f"{name}.key",
            "-out", directory / f"{name}.crt")  # fmt: skip
    return directory


def test_secure_boot_keys_sign_systemd_boot_and_the_kernel(demo_image: str, tmp_path: Path) -> None:
    keys = make_sb_keys(tmp_path / "keys")
    other = make_sb_keys(tmp_path / "other")
    out = tmp_path / "signed.raw"
    bcvk("to-disk", demo_image, str(out), "--secure-boot-keys", str(keys), check=True)
    esp = extract(out, ESP_START, tmp_path / "esp.img", 512 * MIB)
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    (entry_name,) = subprocess.run(["mdir", "-b", "-i", esp, "::/loader/entries"],
                                   capture_output=True, text=True, env=env,
                                   check=True).stdout.split()  # fmt: skip
    entry = subprocess.run(["mtype", "-i", esp, entry_name], capture_output=True, text=True,
                           env=env, check=True).stdout  # fmt: skip
    kernel = next(line.split()[1] for line in entry.splitlines() if line.startswith("linux "))
    for path in ("/EFI/BOOT/BOOTX64.EFI", "/EFI/systemd/systemd-bootx64.efi", kernel):
        local = tmp_path / Path(path).name
        subprocess.run(["mcopy", "-n", "-i", esp, f"::{path}", local], env=env, check=True)
        assert run("sbverify", "--cert", keys / "db.crt", local, check=False).returncode == 0, path
        assert run("sbverify", "--cert", other / "db.crt", local, check=False).returncode != 0
    # Another db key is another disk: the cache does not hand back the first.
    again = bcvk("to-disk", demo_image, str(out), "--secure-boot-keys", str(other), "--dry-run")
    assert again.stdout == "would-regenerate\n"
    assert bcvk("to-disk", demo_image, str(out), "--secure-boot-keys", str(keys),
                "--dry-run").stdout == "would-reuse\n"  # fmt: skip


def test_xfs_checks_clean_and_reports_its_losses(demo_image: str, tmp_path: Path) -> None:
    out = tmp_path / "disk.raw"
    result = bcvk("to-disk", demo_image, str(out), "--filesystem", "xfs", check=True)
    # Debian 12's protofile drops these; bcvk must say so, item by item
    assert "mkfs.xfs -p (protofile) cannot preserve everything" in result.stderr
    assert "/var/log/journal (system.posix_acl_access, system.posix_acl_default)" in result.stderr
    assert "/usr/bin/perl = /usr/bin/perl5.36.0" in result.stderr
    assert "/var/lib/ucf/cache/:etc:ssh:sshd_config" in result.stderr
    root = extract(out, ROOT_START, tmp_path / "root.img")
    assert run("xfs_repair", "-n", root, check=False).returncode == 0
    with loop_mounted(root, tmp_path / "mnt") as mnt:
        assert "/ xfs defaults 0 0" in (mnt / "etc" / "fstab").read_text()
        assert stat.S_IMODE((mnt / "tmp").stat().st_mode) == 0o1777  # fixed with xfs_db
        assert (mnt / "usr" / "bin" / "passwd").stat().st_mode & stat.S_ISUID
        chage = (mnt / "usr" / "bin" / "chage").stat()
        assert chage.st_mode & stat.S_ISGID
        assert chage.st_gid == 42  # group shadow
        assert (mnt / "usr" / "lib" / "modules").is_dir()
        assert (mnt / "etc" / "machine-id").read_text() == ""


def test_btrfs_checks_clean_and_reports_its_losses(demo_image: str, tmp_path: Path) -> None:
    out = tmp_path / "disk.qcow2"
    result = bcvk("to-disk", demo_image, str(out), "--filesystem", "btrfs", check=True)
    assert "mkfs.btrfs --rootdir cannot preserve everything" in result.stderr
    assert "/dev/null (c 1:3)" in result.stderr
    raw = tmp_path / "disk.raw"
    run("qemu-img", "convert", "-O", "raw", out, raw)
    root = extract(raw, ROOT_START, tmp_path / "root.img")
    raw.unlink()
    check = run("btrfs", "check", "--readonly", root, check=False)
    assert check.returncode == 0, check.stderr
    with loop_mounted(root, tmp_path / "mnt") as mnt:
        assert "/ btrfs defaults 0 0" in (mnt / "etc" / "fstab").read_text()
        assert stat.S_IMODE((mnt / "tmp").stat().st_mode) == 0o1777
        perl = mnt / "usr" / "bin" / "perl"
        assert perl.stat().st_ino == (mnt / "usr" / "bin" / "perl5.36.0").stat().st_ino
        assert os.listxattr(mnt / "var" / "log" / "journal")
        assert (mnt / "boot" / "efi").is_dir()


def test_mbr_partition_table(demo_image: str, tmp_path: Path) -> None:
    out = tmp_path / "disk.raw"
    bcvk("to-disk", demo_image, str(out), "--partition-table", "mbr", check=True)
    table = json.loads(run("sfdisk", "--json", out).stdout)["partitiontable"]
    assert table["label"] == "dos"
    assert [p["type"] for p in table["partitions"]] == ["ef", "83"]
    assert table["partitions"][0].get("bootable") is True


def test_root_size(demo_image: str, tmp_path: Path) -> None:
    out = tmp_path / "disk.raw"
    bcvk("to-disk", demo_image, str(out), "--disk-size", "6G", "--root-size", "2G", check=True)
    table = json.loads(run("sfdisk", "--json", out).stdout)["partitiontable"]
    assert out.stat().st_size == 6 * 1024**3
    assert table["partitions"][1]["size"] * 512 == 2 * 1024**3


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("fixture", "message"),
    [
        ("not-bootc", "is not a bootc image"),
        ("unlabelled", "is not a bootc image"),
        ("no-kernel", "no kernel found under /usr/lib/modules"),
        ("two-kernels", "kernels, need exactly one"),
    ],
)
def test_bad_images(
    fixture_image: dict[str, str], tmp_path: Path, fixture: str, message: str, no_mount_leaks: None
) -> None:
    result = bcvk("to-disk", fixture_image[fixture], str(tmp_path / "x.qcow2"))
    assert result.returncode == 1
    assert message in result.stderr
    assert "hint:" in result.stderr
    assert "Traceback" not in result.stderr
    assert leftovers(tmp_path) == []


def test_too_small_names_the_minimum(demo_image: str, tmp_path: Path, no_mount_leaks: None) -> None:
    result = bcvk("to-disk", demo_image, str(tmp_path / "x.raw"), "--disk-size", "1G")
    assert result.returncode == 2
    assert "disk size 1.0 GiB is too small for this image: the minimum is" in result.stderr
    assert leftovers(tmp_path) == []
    result = bcvk("to-disk", demo_image, str(tmp_path / "x.raw"), "--root-size", "200M")
    assert "root size 200.0 MiB is too small" in result.stderr
    assert leftovers(tmp_path) == []


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *options: str) -> Iterator[Path]:
    path.mkdir()
    run("mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "bcvk-test", path)
    try:
        yield path
    finally:
        run("umount", path)


def test_read_only_output_directory(demo_image: str, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "1m", "ro") as ro:
        result = bcvk("to-disk", demo_image, str(ro / "x.raw"))
        assert result.returncode == 1
        assert f"cannot create files in the output directory {ro}" in result.stderr
        assert "Read-only file system" in result.stderr


def test_disk_full_midway_leaves_nothing(
    demo_image: str, tmp_path: Path, no_mount_leaks: None
) -> None:
    # room for the root filesystem file but not for the qcow2 made from it
    with tmpfs(tmp_path / "small", "600m") as small:
        result = bcvk("to-disk", demo_image, str(small / "x.qcow2"))
        assert result.returncode == 1, result.stderr
        assert "no space left on the filesystem holding" in result.stderr
        assert "nothing was written to OUTPUT" in result.stderr
        assert leftovers(small) == []


def _interrupt_midway(argv: list[str], directory: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    # wait until the root filesystem is being written
    while time.monotonic() < deadline:
        if any(directory.glob(".*.bcvk-*/root.img")):
            break
        time.sleep(0.05)
    else:
        proc.kill()
        raise AssertionError("the build never started writing")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_ctrl_c_midway_leaves_nothing_and_keeps_the_old_disk(
    demo_image: str, tmp_path: Path, no_mount_leaks: None
) -> None:
    from tests.conftest import bcvk_bin

    out = tmp_path / "x.qcow2"
    result = _interrupt_midway([bcvk_bin(), "to-disk", demo_image, str(out)], tmp_path)
    assert result.returncode == 130, result.stderr
    assert "error: aborted" in result.stderr or "error: interrupted" in result.stderr
    assert leftovers(tmp_path) == []

    bcvk("to-disk", demo_image, str(out), check=True)
    before = (out.stat().st_ino, out.stat().st_mtime_ns, xattrs(out))
    argv = [bcvk_bin(), "to-disk", demo_image, str(out), "--karg", "quiet"]
    result = _interrupt_midway(argv, tmp_path)
    assert result.returncode == 130
    assert leftovers(tmp_path) == ["x.qcow2"]
    assert (out.stat().st_ino, out.stat().st_mtime_ns, xattrs(out)) == before


def test_sigkill_leftovers_are_swept_by_the_next_run(
    demo_image: str, tmp_path: Path, no_mount_leaks: None
) -> None:
    from tests.conftest import bcvk_bin

    out = tmp_path / "x.qcow2"
    argv = [bcvk_bin(), "to-disk", demo_image, str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not any(tmp_path.glob(".*.bcvk-*/root.img")):
        assert time.monotonic() < deadline, "the build never started writing"
        time.sleep(0.05)
    proc.kill()
    proc.communicate(timeout=60)
    # SIGKILL skips every cleanup: the work directory (and the image mount)
    # stay, recorded; the next build for OUTPUT undoes them, then builds.
    (stale,) = [p.name for p in tmp_path.iterdir()]
    assert stale.startswith(".x.qcow2.bcvk-")

    result = bcvk("to-disk", demo_image, str(out), check=True)
    assert "left by an interrupted to-disk" in result.stderr
    assert leftovers(tmp_path) == ["x.qcow2"]


def test_force_replaces_a_foreign_file(demo_image: str, tmp_path: Path) -> None:
    out = tmp_path / "x.raw"
    out.write_text("not a disk")
    refused = bcvk("to-disk", demo_image, str(out))
    assert refused.returncode == 1
    assert "refusing to overwrite" in refused.stderr
    assert out.read_text() == "not a disk"
    bcvk("to-disk", demo_image, str(out), "--force", check=True)
    assert out.stat().st_size == 4 * 1024**3
