"""`bcvk ephemeral …` parsing and validation, and error paths with fake binaries."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from bcvk import ephemeral, values
from bcvk.__main__ import main
from bcvk.ephemeral import options
from bcvk.errors import BcvkError, UsageError
from bcvk.guest import logdir, mounts
from bcvk.host import ssh
from bcvk.log import console_tail
from bcvk.values import PortForward
from tests.conftest import FakeBin

IMAGE = "localhost/bcvk/debian-bootc:12"


# ---------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("text", "mib"), [("2G", 2048), ("1024", 1024), ("512M", 512), ("1g", 1024), ("1.5G", 1536)]
)
def test_memory(text: str, mib: int) -> None:
    assert values.parse_memory(text) == mib


@pytest.mark.parametrize("text", ["", "lots", "0", "64M", "2T", "-1G", "1G; rm -rf /"])
def test_bad_memory(text: str) -> None:
    with pytest.raises(UsageError, match="--memory"):
        values.parse_memory(text)


@pytest.mark.parametrize("text", ["0", "-1", "257", "two", "1.5"])
def test_bad_vcpus(text: str) -> None:
    with pytest.raises(UsageError, match="--vcpus"):
        values.parse_vcpus(text)


def test_itype_overrides_memory_and_vcpus() -> None:
    opts = ephemeral.make_options(IMAGE, memory="8G", vcpus=3, itype="u1.micro")
    assert (opts.vcpus, opts.memory_mib) == (1, 1024)
    with pytest.raises(UsageError, match="unknown instance type"):
        ephemeral.make_options(IMAGE, itype="m5.large")


def test_defaults() -> None:
    opts = ephemeral.make_options(IMAGE)
    assert opts.memory_mib == 2048
    assert opts.vcpus == min(os.cpu_count() or 2, 4)
    assert opts.ssh_timeout == 240
    assert opts.pull == "missing"
    assert opts.rootfs == "auto"


@pytest.mark.parametrize(
    ("text", "fwd"), [("8080:80", PortForward(8080, 80)), ("1:65535", PortForward(1, 65535))]
)
def test_ports(text: str, fwd: PortForward) -> None:
    assert PortForward.parse(text) == fwd


@pytest.mark.parametrize("text", ["80", "0:80", "70000:80", "a:b", "1:2:3", "127.0.0.1:80:80"])
def test_bad_ports(text: str) -> None:
    with pytest.raises(UsageError):
        PortForward.parse(text)


def test_binds(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    bind = mounts.parse_named(str(tmp_path / "data"), readonly=False)
    assert (bind.tag, bind.readonly) == ("mount_data", False)
    assert bind.target == "/run/virtiofs-mnt-data"
    named = mounts.parse_named(f"{tmp_path / 'data'}:src", readonly=True)
    assert (named.tag, named.readonly) == ("mount_src", True)
    with pytest.raises(UsageError, match="no such directory"):
        mounts.parse_named(str(tmp_path / "missing"), readonly=False)
    with pytest.raises(UsageError, match="share name"):
        mounts.parse_named(f"{tmp_path / 'data'}:bad name", readonly=False)
    with pytest.raises(UsageError, match="same name"):
        ephemeral.make_options(IMAGE, binds=[str(tmp_path / "data")], ro_binds=[f"{tmp_path}:data"])


def test_disk_files(tmp_path: Path) -> None:
    disk = options.parse_disk(str(tmp_path / "out.qcow2"))
    assert (disk.name, disk.format) == ("output", "qcow2")
    disk = options.parse_disk(f"{tmp_path / 'd.img'}:data:raw")
    assert (disk.name, disk.format) == ("data", "raw")
    with pytest.raises(UsageError, match="not a regular file"):
        options.parse_disk(str(tmp_path))
    with pytest.raises(UsageError, match="disk format"):
        options.parse_disk(f"{tmp_path / 'd'}:x:vdi")
    with pytest.raises(UsageError, match="does not exist"):
        options.parse_disk("/nonexistent-dir/d.img")
    with pytest.raises(UsageError, match="disk name"):
        options.parse_disk(f"{tmp_path / 'd'}:{'n' * 21}")


@pytest.mark.parametrize("karg", ["", "a\nb", "x\x1by", "tab\there"])
def test_bad_kargs(karg: str) -> None:
    with pytest.raises(UsageError, match="kernel argument"):
        ephemeral.make_options(IMAGE, kargs=[karg])


def test_log_dir_forms(tmp_path: Path) -> None:
    assert logdir.parse_log_dir(str(tmp_path)).journal
    console_only = logdir.parse_log_dir(f"console={tmp_path}")
    assert console_only.console
    assert not console_only.journal
    assert logdir.parse_log_dir(f"console,journal={tmp_path}").journal
    with pytest.raises(UsageError, match="--log-dir"):
        logdir.parse_log_dir(f"kmsg={tmp_path}")


def test_log_dir_must_be_a_directory_whose_parent_exists(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("keep")
    with pytest.raises(UsageError, match="not a directory"):
        logdir.parse_log_dir(str(tmp_path / "file"))
    with pytest.raises(UsageError, match="does not exist"):
        logdir.parse_log_dir(str(tmp_path / "a" / "b"))
    with pytest.raises(UsageError, match="cannot expand"):
        logdir.parse_log_dir("~no-such-user-here/logs")
    assert (tmp_path / "file").read_text() == "keep"
    assert logdir.parse_log_dir(str(tmp_path / "new")).directory == tmp_path / "new"


def test_conflicting_flags() -> None:
    with pytest.raises(UsageError, match="--detach"):
        ephemeral.make_options(IMAGE, detach=True, execute=["true"])
    with pytest.raises(UsageError, match="--add-swap"):
        ephemeral.make_options(IMAGE, add_swap="1k")
    with pytest.raises(UsageError, match="--ssh-timeout"):
        ephemeral.make_options(IMAGE, ssh_timeout=0)
    with pytest.raises(UsageError, match="image reference"):
        ephemeral.make_options("bad image;rm")
    with pytest.raises(UsageError, match="VM name"):
        ephemeral.make_options(IMAGE, name="-x")


def test_split_ssh_args() -> None:
    assert ssh.split_args(["-v", "-L", "80:localhost:80", "ls", "-l"]) == (
        ["-v", "-L", "80:localhost:80"],
        ["ls", "-l"],
    )
    assert ssh.split_args(["--", "-x"]) == ([], ["-x"])
    assert ssh.split_args([]) == ([], [])
    with pytest.raises(UsageError):
        ssh.split_args(["-o"])


def test_mount_commands() -> None:
    bind = mounts.named(Path("/srv"), "data", readonly=True)
    assert mounts.mount_command(bind, ninep=False) == (
        "mkdir -p /run/virtiofs-mnt-data && mount -t virtiofs -o ro mount_data "
        "/run/virtiofs-mnt-data"
    )
    assert "-t 9p -o trans=virtio,version=9p2000.L,msize=524288,ro" in mounts.mount_command(
        bind, ninep=True
    )


def test_console_tail_strips_escapes(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"one\r\n\x1b[0;32m  OK  \x1b[0m] Started x.\r\n\r\nbootc login: ")
    assert console_tail(log, 2) == ["OK  ] Started x.", "bootc login:"]
    assert console_tail(tmp_path / "missing") == []


def test_busy_port_is_detected() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(BcvkError, match=f"host port {port} is not available"):
            options.check_ports_free([PortForward(port, 80)])


def test_free_port_avoids_claimed_ports() -> None:
    port = options.free_port(set())
    assert 1024 < port < 65536
    assert options.free_port({port}) != port


# ---------------------------------------------------------------- CLI, end to end


def runtime_entries(home: Path) -> list[str]:
    base = home / "runtime" / "bcvk" / "ephemeral"
    return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.exists() else []


def test_missing_image_with_pull_never(
    fake_bin: FakeBin, isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_bin.add("podman", 'echo "Error: $4: image not known" >&2; exit 125')
    rc = main(["ephemeral", "run-ssh", "--pull", "never", "localhost/nope:1", "--", "true"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "error: image localhost/nope:1 is not in local storage" in err
    assert "hint:" in err
    assert runtime_entries(isolated_home) == []


def test_pull_failure_is_one_clear_error(
    fake_bin: FakeBin, isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_bin.add(
        "podman",
        'case "$1" in pull) echo "Error: connection refused" >&2; exit 125;; esac\n'
        'echo "Error: image not known" >&2; exit 125',
    )
    rc = main(["ephemeral", "run-ssh", "registry.invalid/x:1", "--", "true"])
    assert rc == 1
    assert "could not be pulled" in capsys.readouterr().err
    assert ["pull", "registry.invalid/x:1"] in fake_bin.calls("podman")
    assert runtime_entries(isolated_home) == []


def podman_inspect_json(labels: dict[str, str]) -> str:
    return json.dumps(
        [
            {
                "Id": "ab" * 32,
                "Digest": "sha256:" + "cd" * 32,
                "RepoTags": [IMAGE],
                "Size": 1000,
                "Architecture": "amd64",
                "Os": "linux",
                "Labels": labels,
            }
        ]
    )


def test_requested_virtiofsd_missing_fails_before_any_work(
    fake_bin: FakeBin, isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_bin.add("podman", "exit 99")
    rc = main(["ephemeral", "run", "--virtiofsd", "/nonexistent/virtiofsd", IMAGE])
    assert rc == 1
    assert "virtiofsd /nonexistent/virtiofsd is not an executable file" in capsys.readouterr().err
    assert fake_bin.calls() == []
    assert runtime_entries(isolated_home) == []


def test_bad_values_exit_2_with_a_hint(
    fake_bin: FakeBin, isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (
        ["ephemeral", "run", "--memory", "lots", IMAGE],
        ["ephemeral", "run", "--vcpus", "0", IMAGE],
        ["ephemeral", "run", "--itype", "huge", IMAGE],
        ["ephemeral", "run", "-p", "99999:22", IMAGE],
        ["ephemeral", "run", "--bind", "/nonexistent-dir", IMAGE],
        ["ephemeral", "run", "--name", "no/slash", IMAGE],
        ["ephemeral", "run", "--karg", "a\nb", IMAGE],
        ["run-ephemeral", "--memory", "1", IMAGE],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: "), err
        assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert runtime_entries(isolated_home) == []


def test_ssh_to_an_unknown_vm(fake_bin: FakeBin, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ssh", "nobody"]) == 1
    assert "no ephemeral VM named 'nobody'" in capsys.readouterr().err
    assert main(["ephemeral", "rm", "nobody"]) == 1
    assert main(["ephemeral", "rm", "-f", "nobody"]) == 0


def test_ps_json_with_no_vms(
    fake_bin: FakeBin, isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ephemeral", "ps", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_rm_all_refuses_without_a_terminal(
    fake_bin: FakeBin,
    isolated_home: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bcvk.ephemeral import registry as state

    state.create(
        "held",
        lambda used: state.VmRecord(
            name="held", image=IMAGE, supervisor=state.Proc.of("bcvk", os.getpid(), group=False)
        ),
    )
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert main(["ephemeral", "rm-all"]) == 2
    assert "pass -f" in capsys.readouterr().err
    assert runtime_entries(isolated_home) == ["held"]


def test_hidden_aliases_are_not_listed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "ephemeral" in out
    assert "cache" in out
    assert "run-ephemeral" not in out
    assert main(["run-ephemeral", "--help"]) == 0
    assert "Boot IMAGE as an ephemeral VM" in capsys.readouterr().out


def test_cache_list_and_prune(
    fake_bin: FakeBin, isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bcvk.ephemeral import cache as rootfs

    tree = isolated_home / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/os-release").write_text("ID=x\n")
    rootfs.prepare("localhost/x:1", "ab" * 32, block=False, mount=lambda: tree)
    # podman knows no images at all: the entry's image is gone.
    fake_bin.add("podman", "echo '[]'")
    assert main(["cache", "list", "--format", "json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["image"] == "localhost/x:1"
    assert (entry["image_present"], entry["in_use"], entry["rootfs"]) == (False, False, False)
    assert main(["cache", "prune", "--dry-run"]) == 0
    assert capsys.readouterr().out == "ab" * 32 + "\n"
    assert (isolated_home / "cache" / "bcvk" / "images" / ("ab" * 32)).exists()
    assert main(["cache", "prune"]) == 0
    assert not (isolated_home / "cache" / "bcvk" / "images" / ("ab" * 32)).exists()


# ---------------------------------------------------------------- the launch, with fakes


@pytest.fixture
def fake_host(fake_bin: FakeBin, isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> FakeBin:
    """podman, QEMU and ssh replaced by scripts; a tiny image tree to boot.

    The fake QEMU cannot save a machine: these VMs boot cold (warm start is
    tested in test_warm.py and, with real guests, tests/integration/test_warm.py).
    """
    monkeypatch.setenv("BCVK_WARM", "off")
    tree = isolated_home / "image"
    kdir = tree / "usr/lib/modules/6.1.0-fake"
    kdir.mkdir(parents=True)
    (kdir / "vmlinuz").write_bytes(b"kernel")
    (kdir / "initramfs.img").write_bytes(b"initrd")
    (tree / "usr/sbin").mkdir(parents=True)
    (tree / "usr/sbin/sshd").write_text("")
    (tree / "usr/lib/systemd").mkdir(parents=True)
    (tree / "usr/lib/systemd/systemd").write_text("")
    (tree / "sbin").symlink_to("usr/sbin")
    (tree / "usr/sbin/init").symlink_to("../lib/systemd/systemd")
    (tree / "usr/lib/systemd/libsystemd-shared-252.so").write_text("")
    inspect = podman_inspect_json({"containers.bootc": "1"})
    (fake_bin.directory / "inspect.json").write_text(inspect)
    fake_bin.add(
        "podman",
        'case "$1 $2" in\n'
        f'  "image inspect") cat {fake_bin.directory / "inspect.json"};;\n'
        f'  "image mount") echo {tree};;\n'
        '  "image unmount") echo "$3";;\n'
        "  *) echo '[]';;\n"
        "esac",
    )
    monkeypatch.setenv("BCVK_ACCEL", "tcg")
    monkeypatch.setenv("QEMU_BIN", str(fake_bin.directory / "qemu"))
    monkeypatch.setattr("bcvk.host.virtiofsd.find", lambda explicit=None: None)
    return fake_bin


# A fake QEMU (bash: fds above 9) without a monitor: closing the inherited QMP socket makes
# bcvk's QMP attempts fail at once, so teardown goes straight to signals.
NO_QMP = (
    'for a; do case "$a" in socket,id=qmp,fd=*) n=${a#socket,id=qmp,fd=}; n=${n%%,*}; '
    'eval "exec $n<&-";; esac; done\n'
)


def podman_calls(fake_bin: FakeBin, verb: str) -> int:
    return sum(1 for call in fake_bin.calls("podman") if call[:2] == ["image", verb])


def test_qemu_dying_is_quoted_and_cleaned_up(
    fake_host: FakeBin, isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_host.add("qemu", 'echo "qemu-system-x86_64: cannot set up guest memory" >&2; exit 1')
    rc = main(["ephemeral", "run-ssh", IMAGE, "--", "true"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "QEMU exited during boot (status 1): qemu-system-x86_64: cannot set up" in err
    assert "hint: QEMU cannot give the guest 2048 MiB here: ask for less --memory" in err
    assert "virtiofsd not found; using --rootfs block" in err
    assert runtime_entries(isolated_home) == []
    # The image was mounted once to fill the cache, and unmounted again.
    assert podman_calls(fake_host, "mount") == podman_calls(fake_host, "unmount") == 1


def test_run_ssh_returns_the_remote_status_and_cleans_up(
    fake_host: FakeBin, isolated_home: Path
) -> None:
    argv_log = fake_host.directory / "qemu.argv"
    fake_host.add("qemu", NO_QMP + f'echo "$@" > {argv_log}\nexec sleep 60', shell="/bin/bash")
    fake_host.add("ssh", 'for a; do last="$a"; done\n[ "$last" = true ] && exit 0\nexit 42')
    rc = main(["ephemeral", "run-ssh", "--memory", "1G", "--vcpus", "1", IMAGE, "--", "exit 42"])
    assert rc == 42
    argv = argv_log.read_text()
    assert "-m 1024M" in argv
    assert "-smp 1" in argv
    assert "root=LABEL=bcvk-" in argv
    assert "io.systemd.credential.binary:tmpfiles.extra=" in argv
    assert runtime_entries(isolated_home) == []
    # Cached: the second start needs no mount at all.
    rc = main(["ephemeral", "run-ssh", IMAGE, "--", "exit 42"])
    assert rc == 42
    assert podman_calls(fake_host, "mount") == 1


def test_python_api_start_ssh_stop(fake_host: FakeBin, isolated_home: Path) -> None:
    fake_host.add("qemu", NO_QMP + "exec sleep 60", shell="/bin/bash")
    fake_host.add("ssh", 'for a; do last="$a"; done\necho "ran: $last"')
    with ephemeral.start(IMAGE, name="api-vm", rootfs="block") as vm:
        assert vm.alive()
        assert vm.ssh("uname -r").stdout == "ran: uname -r\n"
        assert [v.name for v in ephemeral.ps()] == ["api-vm"]
        qemu_pid = vm.record.qemu.pid if vm.record.qemu else 0
    assert not vm.alive()
    assert not Path(f"/proc/{qemu_pid}").exists() or "sleep" not in Path(
        f"/proc/{qemu_pid}/cmdline"
    ).read_text(errors="replace")
    assert ephemeral.ps() == []
    assert runtime_entries(isolated_home) == []


def test_progress_line_shows_elapsed_time_and_the_last_console_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from bcvk.ephemeral.vm import StatusLine

    console = tmp_path / "console.log"
    console.write_bytes(b"[  1.0] early\r\n\x1b[0;32m  OK  \x1b[0m] Reached target Network.\r\n")
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    bar = StatusLine(True, "Booting vm…", console)
    bar.update()
    bar.clear()
    assert err.getvalue().startswith("\r\x1b[KBooting vm…    0s  OK  ] Reached target Network.")
    assert err.getvalue().endswith("\r\x1b[K")
    quiet = StatusLine(False, "x", console)
    quiet.update()
    assert err.getvalue().count("Booting") == 1
