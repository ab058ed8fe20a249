"""Regressions of the 2026-12 audit: deletion, races, process identity, injected values."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from bcvk import paths
from bcvk.ephemeral import registry
from bcvk.errors import BcvkError, UsageError
from bcvk.host import proc, ssh
from bcvk.libvirt import xml as lx
from bcvk.pb import model
from bcvk.to_disk import output
from tests.conftest import bcvk
from tests.unit.testdriver import domain_xml, node_file

# ------------------------------------------------------------------ the final rename


def built(tmp_path: Path) -> Path:
    dest = tmp_path / "work" / "disk.raw"
    dest.parent.mkdir()
    dest.write_text("bcvk's disk")
    return dest


def test_a_file_that_appears_at_output_during_the_build_is_kept(tmp_path: Path) -> None:
    dest, out = built(tmp_path), tmp_path / "out.raw"
    out.write_text("FOREIGN user file")  # absent when the build began
    with pytest.raises(BcvkError, match="created by someone else while the disk was built"):
        output.finish(dest, out, "sha256:x", "sha256:d")
    assert out.read_text() == "FOREIGN user file"
    assert dest.read_text() == "bcvk's disk"


def test_a_file_put_in_place_of_bcvks_own_is_kept(tmp_path: Path) -> None:
    dest, out = built(tmp_path), tmp_path / "out.raw"
    out.write_text("someone else's, written over bcvk's old disk")
    with pytest.raises(BcvkError, match="created by someone else"):
        output.finish(dest, out, "sha256:x", "sha256:d")
    assert out.read_text().startswith("someone else's")


def test_bcvks_own_output_is_replaced_and_force_replaces_a_foreign_one(tmp_path: Path) -> None:
    out = tmp_path / "out.raw"
    out.write_text("old")
    os.setxattr(out, output.XATTR_HASH, b"sha256:old")
    output.finish(built(tmp_path), out, "sha256:new", "sha256:d")
    assert out.read_text() == "bcvk's disk"
    assert output.read_xattr(out, output.XATTR_HASH) == "sha256:new"
    foreign = tmp_path / "foreign.raw"
    foreign.write_text("theirs")
    dest = tmp_path / "again.raw"
    dest.write_text("bcvk's disk")
    output.finish(dest, foreign, "sha256:new", "sha256:d", force=True)
    assert foreign.read_text() == "bcvk's disk"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("again")] == []


def test_one_build_at_a_time_per_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    out = tmp_path / "out.qcow2"
    inside: list[int] = []
    overlap: list[bool] = []

    def build() -> None:
        with output.exclusive(out):
            overlap.append(bool(inside))
            inside.append(1)
            time.sleep(0.2)
            inside.pop()

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlap == [False, False, False]


# ------------------------------------------------------------------ processes


def test_a_reused_pid_is_never_signalled(tmp_path: Path) -> None:
    """A dead VM's QEMU pid now leads an unrelated session: reaping must not touch it."""
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        began = proc.start_time(victim.pid)
        assert began is not None
        # What bcvk recorded for its QEMU: this pid, an earlier start, the VM's token.
        recorded = registry.Proc("qemu", victim.pid, began - 100, token="ab" * 16)
        assert not recorded.alive()
        assert recorded.members() == []
        registry.terminate([recorded], timeout=0.5)
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_a_marked_child_is_a_member(tmp_path: Path) -> None:
    token = "cd" * 16
    env = {**os.environ, registry.TOKEN_VAR: token}
    child = subprocess.Popen(["sleep", "60"], start_new_session=True, env=env)
    try:
        proc = registry.Proc.of("qemu", child.pid, token=token)
        assert proc.members() == [child.pid]
        registry.terminate([proc], timeout=5)
        assert child.wait(timeout=5) == -signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()


# ------------------------------------------------------------------ values reaching ssh


@pytest.mark.parametrize("user", ["-oProxyCommand=touch /tmp/x", "root\n", "a b", "", "Root"])
def test_an_ssh_user_that_is_no_login_name_is_refused(user: str) -> None:
    with pytest.raises(UsageError, match="invalid user name"):
        ssh.Target(port=22, key=Path("/k"), user=user)


def test_user_and_host_come_after_what_ssh_reads_as_options() -> None:
    argv = ssh.argv(ssh.Target(port=2222, key=Path("/k"), user="core"), ["id"])
    assert argv[argv.index("-l") + 1] == "core"
    assert argv[-3:] == ["--", "127.0.0.1", "id"]


def test_users_ssh_options_come_first_so_they_win() -> None:
    options = ssh.user_options(["ServerAliveInterval=30"], strict_host_keys=True, log_level="debug")
    assert options == (
        "ServerAliveInterval=30", "LogLevel=DEBUG",
        "StrictHostKeyChecking=yes", "UserKnownHostsFile=~/.ssh/known_hosts",
    )  # fmt: skip
    argv = ssh.argv(ssh.Target(port=2222, key=Path("/k"), options=options), ["id"])
    given = [argv[i + 1] for i, word in enumerate(argv) if word == "-o"]
    # ssh takes the first value of each option it reads: the user's beat bcvk's defaults.
    assert given.index("StrictHostKeyChecking=yes") < given.index("StrictHostKeyChecking=no")
    assert given.index("LogLevel=DEBUG") < given.index("LogLevel=ERROR")


@pytest.mark.parametrize(
    ("extra", "level"),
    [(["Bad Key=1"], None), (["NoValue"], None), (["A=b\nProxyCommand=x"], None), ([], "LOUD")],
)
def test_bad_ssh_options_are_refused(extra: list[str], level: str | None) -> None:
    with pytest.raises(UsageError, match="invalid SSH"):
        ssh.user_options(extra, log_level=level)


def metadata_with_user(key: Path, user: str) -> str:
    md = lx.Metadata(
        source_image="localhost/x:1", ssh_port=2299, ssh_private_key_path=str(key), ssh_user=user
    )
    return domain_xml("inj", md.to_element(), running=True)


def test_metadata_cannot_run_a_local_command_through_ssh(tmp_path: Path) -> None:
    pwned = tmp_path / "pwned"
    key = tmp_path / "id_ed25519"
    key.write_text("")
    uri = node_file(tmp_path, [metadata_with_user(key, f"-oProxyCommand=touch {pwned}")])
    result = bcvk("libvirt", "-c", uri, "ssh", "inj", "--timeout", "3", "--", "true")
    assert result.returncode != 0
    assert "invalid user name" in result.stderr
    assert not list(tmp_path.glob("pwned*"))


def test_pb_ssh_user_cannot_run_a_local_command(tmp_path: Path) -> None:
    pwned = tmp_path / "pwned"
    info = model.PbInfo(id="0123456789ab", name=None, image_id="a" * 64, repository="x")
    md = lx.Metadata(source_image="x", ssh_port=2298, ssh_private_key_path="/k/id")
    root = md.to_element()
    root.append(info.to_element())
    uri = node_file(tmp_path, [domain_xml("podman-bootc-0123456789ab", root, running=True)])
    runtime = {"XDG_RUNTIME_DIR": str(tmp_path)}
    result = bcvk("pb", "-c", uri, "ssh", "-u", f"-oProxyCommand=touch {pwned}",
                  "0123456789ab", "--", "true", env=runtime)  # fmt: skip
    assert result.returncode != 0
    assert "invalid user name" in result.stderr
    assert not list(tmp_path.glob("pwned*"))


# ------------------------------------------------------------------ locks


def test_the_base_disk_lock_serialises_builders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bcvk.libvirt import basedisks

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))

    class Named:
        uri = "test:///default"
        name = "default"

    order: list[str] = []

    def builder(tag: str) -> None:
        with basedisks.build_lock(Named(), Named(), "bootc-base-x.qcow2"):  # type: ignore[arg-type]
            order.append(f"{tag}+")
            time.sleep(0.2)
            order.append(f"{tag}-")

    threads = [threading.Thread(target=builder, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order in (["a+", "a-", "b+", "b-"], ["b+", "b-", "a+", "a-"])
    assert paths.runtime_dir().joinpath("locks").is_dir()


# ------------------------------------------------------------------ files into disks

PUBLIC = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBcvkStandIn test\n"


def test_only_public_keys_go_into_a_disk(tmp_path: Path) -> None:
    from bcvk.to_disk import DiskFormat, Options, options

    good = tmp_path / "ok.pub"
    good.write_text('# a comment\nno-agent-forwarding,from="10.0.0.0/8" ' + PUBLIC)
    options.validate(Options(root_ssh_authorized_keys=good), DiskFormat.raw)
    private = tmp_path / "id_ed25519"
    private.write_text(
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE KEY-----\n"
    )
    with pytest.raises(UsageError, match="holds a private key"):
        options.validate(Options(root_ssh_authorized_keys=private), DiskFormat.raw)
    junk = tmp_path / "junk"
    junk.write_text(PUBLIC + "ssh-ed25519 not-base64!\n")
    with pytest.raises(UsageError, match=r"not a list of SSH public keys \(entry 2\)"):
        options.validate(Options(root_ssh_authorized_keys=junk), DiskFormat.raw)


@pytest.mark.parametrize("bad", ['/work/My "disks"/x', "/work/x\nwrite /etc/shadow /stolen"])
def test_debugfs_scripts_refuse_paths_they_cannot_quote(bad: str) -> None:
    from bcvk.to_disk import mkfs
    from bcvk.to_disk.treecopy import Extra

    with pytest.raises(ValueError, match="cannot be written in a debugfs script"):
        mkfs.debugfs_script([Extra("/etc/fstab", "file", 0o644, bad)], {})


def test_staged_extras_never_live_beside_output(tmp_path: Path) -> None:
    from bcvk.to_disk import native

    with native.stage_dir() as stage:
        assert '"' not in str(stage)
        assert "\n" not in str(stage)
        assert not stage.is_relative_to(tmp_path)


def test_an_interrupt_dropped_while_forking_is_raised_after_popen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CPython drops a KeyboardInterrupt raised in its at-fork callbacks (CI saw
    a Ctrl-C lost so, and the build finished): run.py raises it once Popen
    returns, and the child it had just started is killed and reaped."""
    import subprocess

    from bcvk import run

    started: list[subprocess.Popen[bytes]] = []
    real = subprocess.Popen

    def popen_during_which_a_signal_is_dropped(*args: object, **kwargs: object) -> object:
        child = real(*args, **kwargs)  # type: ignore[call-overload]
        started.append(child)
        run.note_interrupt()  # the handler ran; its exception went nowhere
        return child

    monkeypatch.setattr(subprocess, "Popen", popen_during_which_a_signal_is_dropped)
    with pytest.raises(KeyboardInterrupt):
        run.run(["sleep", "30"])
    assert started[0].returncode == -9
    with pytest.raises(KeyboardInterrupt):
        run.spawn(["sleep", "30"])
    assert started[1].returncode == -9
    monkeypatch.setattr(subprocess, "Popen", real)
    assert run.run(["true"]).returncode == 0  # a signal taken before is not raised again
