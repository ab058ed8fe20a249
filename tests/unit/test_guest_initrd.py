"""bcvk's initramfs archive, the guest's boot report and --execute's status line."""

from __future__ import annotations

import gzip
import re
import shutil
import stat
import subprocess
import zlib
from pathlib import Path
from typing import Any

import pytest

from bcvk.ephemeral.execute import exit_status
from bcvk.guest import initrd, report
from bcvk.image.initramfs import cpio_names


def test_archive_is_stable_and_lists_parents_first() -> None:
    assert initrd.archive() == initrd.archive()
    names, end = cpio_names(initrd.archive())
    assert end == len(initrd.archive())
    assert end % 4 == 0
    for name in names:
        parent = name.rpartition("/")[0]
        assert not parent or names.index(parent) < names.index(name), name
    assert "bcvk/layout.sh" in names
    assert "etc/systemd/system/initrd.target.wants/bcvk-layout.service" in names
    assert "conf/conf.d/zz-bcvk" in names


def test_archive_unpacks_with_cpio(tmp_path: Path) -> None:
    """GNU cpio reads the archive as the kernel will: files, modes and the link."""
    cpio = shutil.which("cpio")
    assert cpio is not None, "cpio is in scripts/host-packages.txt"
    subprocess.run(
        [cpio, "-id", "--quiet", "--no-absolute-filenames"],
        input=initrd.archive(),
        cwd=tmp_path,
        check=True,
    )
    link = tmp_path / "etc/systemd/system/initrd.target.wants/bcvk-layout.service"
    assert link.is_symlink()
    assert link.resolve() == (tmp_path / "etc/systemd/system/bcvk-layout.service").resolve()
    layout = tmp_path / "bcvk/layout.sh"
    assert stat.S_IMODE(layout.stat().st_mode) == 0o644  # run as `sh layout.sh`
    assert (
        "ExecStart=sh /bcvk/layout.sh /sysroot"
        in (tmp_path / "etc/systemd/system/bcvk-layout.service").read_text()
    )


@pytest.mark.parametrize("script", ["layout.sh", "status.sh", "execute-done.sh"])
def test_guest_scripts_are_posix_sh(script: str, tmp_path: Path) -> None:
    text = initrd._text(script)
    path = tmp_path / script
    path.write_bytes(text)
    # dash is the strictest POSIX shell here (klibc's and busybox's sh are alike).
    subprocess.run(["dash", "-n", str(path)], check=True)


def test_execute_script_quotes_each_command_and_stops_at_a_failure() -> None:
    script = initrd.execute_script(("echo 'a b'; false", "touch /never"))
    assert script.splitlines()[1:] == [
        "sh -c 'echo '\"'\"'a b'\"'\"'; false' || exit $?",
        "sh -c 'touch /never' || exit $?",
    ]
    done = subprocess.run(
        ["sh", "-c", initrd.execute_script(("exit 7", "echo no"))], capture_output=True, text=True
    )
    assert (done.returncode, done.stdout) == (7, "")


def unit(name: str, load: str, active: str, result: str = "success") -> str:
    return f"unit {name} LoadState={load} ActiveState={active} SubState=x Result={result}"


REPORT_UP = """unit ssh.service Result=success LoadState=loaded ActiveState=active SubState=running
unit sshd.service Result=success LoadState=not-found ActiveState=inactive SubState=dead
key present
done
"""


def test_report_is_none_until_complete() -> None:
    assert report.parse(REPORT_UP.replace("done\n", "")) is None
    got = report.parse(REPORT_UP)
    assert got is not None
    assert got.ssh_running()
    assert got.ssh_problem() is None
    assert got.key_present
    assert not got.execute_present


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (
            [unit("ssh.service", "masked", "inactive")],
            "ssh.service is masked",
        ),
        (
            [unit("ssh.service", "loaded", "failed", "exit-code")],
            "ssh.service failed (result: exit-code)",
        ),
        (
            [unit("ssh.service", "not-found", "inactive")],
            "the image has no SSH unit",
        ),
        (
            [
                unit("ssh.service", "loaded", "inactive"),
                "problem /var is read-only: no tmpfs for it",
            ],
            "no SSH unit was started: ssh.service (inactive); /var is read-only: no tmpfs for it",
        ),
    ],
)
def test_report_says_why_ssh_will_not_answer(lines: list[str], expected: str) -> None:
    got = report.parse("\n".join([*lines, "key missing", "done"]))
    assert got is not None
    problem = got.ssh_problem()
    assert problem is not None
    assert problem.startswith(expected)


def test_restarting_sshd_is_not_a_failure() -> None:
    line = "unit ssh.service LoadState=loaded ActiveState=activating SubState=auto-restart"
    got = report.parse(line + "\ndone\n")
    assert got is not None
    assert got.ssh_problem() is None


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("result=success code=exited status=0", 0),
        ("result=exit-code code=exited status=3", 3),
        ("result=signal code=killed status=TERM", 143),
        ("result=signal code=dumped status=SEGV", 139),
        ("result=x code=weird status=?", 1),
        ("", None),
    ],
)
def test_execute_exit_status(text: str, status: int | None) -> None:
    assert exit_status(text) == status


def test_units_directory_with_wants_links(tmp_path: Path) -> None:
    (tmp_path / "verify.service").write_text("[Unit]\nDescription=v\n")
    wants = tmp_path / "default.target.wants"
    wants.mkdir()
    (wants / "verify.service").symlink_to("../verify.service")
    members = initrd.units_members(tmp_path)
    by_path = {m.path: m for m in members}
    assert by_path["bcvk/units/verify.service"].data == b"[Unit]\nDescription=v\n"
    link = by_path["bcvk/units/default.target.wants/verify.service"]
    assert stat.S_ISLNK(link.mode)
    assert link.data == b"../verify.service"
    assert stat.S_ISDIR(by_path["bcvk/units/default.target.wants"].mode)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"notes.txt": "hello"}, "notes.txt is not a unit file or a *.wants/ directory"),
        ({"x.service": "just text"}, "x.service is not a unit file (it has no [Section])"),
        ({"x.service": "[Unit]\0"}, "x.service is not a text file"),
        ({}, "no unit files in it"),
    ],
)
def test_units_directory_refuses_what_is_not_a_unit(
    tmp_path: Path, files: dict[str, str], expected: str
) -> None:
    from bcvk.errors import UsageError

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(UsageError, match=re.escape(expected)):
        initrd.units_members(tmp_path)


def test_units_archive_follows_the_initramfs(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(b"abcde")
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "a.service").write_text("[Service]\nExecStart=true\n")
    out = initrd.with_units(base, initrd.units_members(tmp_path / "u"), tmp_path / "out.img")
    data = out.read_bytes()
    assert data[:8] == b"abcde\0\0\0"
    names, end = cpio_names(data, 8)
    assert names == ["bcvk", "bcvk/units", "bcvk/units/a.service"]
    assert end == len(data)


def test_cloud_init_seed_from_a_file_or_a_directory(tmp_path: Path) -> None:
    from bcvk.guest import cloudinit

    (tmp_path / "user-data").write_text("#cloud-config\n")
    (tmp_path / "meta-data").write_text("instance-id: x\n")
    (tmp_path / "other").write_text("not read")
    assert cloudinit.read_seed(str(tmp_path)) == (
        ("user-data", "#cloud-config\n"),
        ("meta-data", "instance-id: x\n"),
    )
    assert cloudinit.read_seed(str(tmp_path / "user-data")) == (("user-data", "#cloud-config\n"),)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: p, "the directory has no user-data file"),
        (lambda p: p / "nope", "no such file or directory"),
        (lambda p: (p / "bin").write_bytes(b"\xff\xfe") and p / "bin", "not a text file"),
    ],
)
def test_cloud_init_seed_refuses(tmp_path: Path, make: Any, expected: str) -> None:
    from bcvk.errors import UsageError
    from bcvk.guest import cloudinit

    with pytest.raises(UsageError, match=expected):
        cloudinit.read_seed(str(make(tmp_path)))


@pytest.mark.parametrize(
    ("text", "side"),
    [
        ("dev:/etc/hostname", ("dev", "/etc/hostname")),
        ("dev:", ("dev", "")),
        ("./dev:x", (None, "./dev:x")),
        ("/abs/path", (None, "/abs/path")),
        ("-rf:x", (None, "-rf:x")),  # not a VM name: a local path, after scp's --
    ],
)
def test_scp_sides(text: str, side: tuple[str | None, str]) -> None:
    from bcvk.host import ssh

    assert ssh.scp_side(text) == side


def test_scp_argv_puts_paths_after_the_end_of_options(tmp_path: Path) -> None:
    from bcvk.host import ssh

    target = ssh.Target(port=2222, key=tmp_path / "k")
    argv = ssh.scp_argv(
        target, ["-oProxyCommand=x"], ssh.scp_remote(target, "/tmp"), recursive=True
    )
    assert argv[argv.index("--") :] == ["--", "-oProxyCommand=x", "root@127.0.0.1:/tmp"]
    assert "-r" in argv
    assert argv[argv.index("-P") + 1] == "2222"


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (
            None,
            'graphroot = "/var/lib/containers/storage"\n[storage.options]\nadditionalimagestores',
        ),
        ('[storage.options]\nmount_program = "x"\n', "[storage.options]\nadditionalimagestores"),
        (
            '[storage]\ndriver = "overlay"\n',
            '"overlay"\n\n[storage.options]\nadditionalimagestores',
        ),
        ('[storage.options]\nadditionalimagestores = ["/a"]\n', 'additionalimagestores = ["/a"]\n'),
    ],
)
def test_host_storage_setup_edits_storage_conf(
    tmp_path: Path, before: str | None, after: str
) -> None:
    """--bind-storage-ro's guest step, run against a scratch /etc."""
    from bcvk.guest import mounts

    etc = tmp_path / "etc"
    (etc / "containers").mkdir(parents=True)
    conf = etc / "containers" / "storage.conf"
    if before is not None:
        conf.write_text(before)
    script = mounts.host_storage_setup().replace("/etc/", f"{etc}/")
    subprocess.run(["dash", "-c", script], check=True)
    subprocess.run(["dash", "-c", script], check=True)  # a second run changes nothing
    assert after in conf.read_text()
    assert conf.read_text().count("additionalimagestores") == 1
    assert (etc / "environment").read_text() == mounts.HOST_STORAGE_ENV + "\n"


def test_boot_time_mount_units_for_shares(tmp_path: Path) -> None:
    from bcvk.guest import mounts

    share = mounts.named(tmp_path, "data", readonly=True)
    members = initrd.mount_members([share])
    by_path = {m.path: m for m in members}
    unit = by_path["bcvk/units/run-virtiofs\\x2dmnt\\x2ddata.mount"]
    assert b"What=mount_data\n" in unit.data
    assert b"Options=ro\n" in unit.data
    link = by_path["bcvk/units/local-fs.target.wants/run-virtiofs\\x2dmnt\\x2ddata.mount"]
    assert link.data == b"../run-virtiofs\\x2dmnt\\x2ddata.mount"
    assert members[0].path == "bcvk/units/local-fs.target.wants"
    assert initrd.mount_members([]) == []


def test_unreadable_wants_directory_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bcvk.errors import UsageError

    (tmp_path / "x.service").write_text("[Unit]\n")
    wants = tmp_path / "a.target.wants"
    wants.mkdir()
    real = Path.iterdir

    def iterdir(self: Path) -> Any:
        if self == wants:  # root reads any directory: the refusal is simulated
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(UsageError, match="a.target.wants: Permission denied"):
        initrd.units_members(tmp_path)


def test_the_disk_variant_carries_the_marker_and_the_same_services() -> None:
    """A libvirt base disk's second initrd: layout.sh sees /bcvk/disk and leaves
    the (writable) root alone, but installs the same units."""
    plain = {m.path: m for m in initrd.members()}
    disk = {m.path: m for m in initrd.members(disk=True)}
    assert set(disk) - set(plain) == {"bcvk/disk"}
    assert all(disk[path] == member for path, member in plain.items())
    assert initrd.digest(disk=True) != initrd.digest()
    layout = disk["bcvk/layout.sh"].data.decode()
    assert "[ -e /bcvk/disk ] || layout" in layout


def kernel_takes(initramfs: bytes) -> list[bytes]:
    """The archives Linux's unpack_to_rootfs takes from INITRAMFS, as its loop
    does: zero bytes skipped, a plain cpio only at a 4-byte offset, anything
    else must be a compressed stream (gzip here); "invalid magic" ends it."""
    taken, offset = [], 0
    while offset < len(initramfs):
        if initramfs[offset] == 0:
            offset += 1
        elif initramfs[offset : offset + 6] == b"070701" and offset % 4 == 0:
            end = initramfs.index(b"TRAILER!!!", offset) + len(b"TRAILER!!!") + 1
            end += -end % 4
            taken.append(initramfs[offset:end])
            offset = end
        elif initramfs[offset : offset + 2] == b"\x1f\x8b":
            stream = zlib.decompressobj(wbits=31)
            taken.append(stream.decompress(initramfs[offset:]))
            offset = len(initramfs) - len(stream.unused_data)
        else:
            break  # "invalid magic at start of compressed archive"
    return taken


@pytest.mark.parametrize("size", [27281099, 27281100, 27281101, 27281102])
def test_the_disk_archive_is_unpacked_after_an_initrd_of_any_size(size: int) -> None:
    """systemd-boot puts a boot entry's initrds end to end without padding: the
    second one must be taken whatever the first one's size."""
    first = gzip.compress(initrd.cpio([initrd.Member("init", stat.S_IFREG | 0o755, b"#!")]))
    # a gzip member's trailing garbage is what makes up the size: pad with zeros
    image_initrd = first + b"\0" * (size % 4 + 4 - len(first) % 4)
    assert len(image_initrd) % 4 == size % 4
    taken = kernel_takes(image_initrd + initrd.disk_archive())
    assert taken[-1] == initrd.archive(disk=True)
    # the plain archive is lost after an unaligned initrd (the bug this prevents)
    if size % 4:
        assert initrd.archive(disk=True) not in kernel_takes(image_initrd + initrd.archive(True))
