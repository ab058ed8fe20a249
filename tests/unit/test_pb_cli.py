"""`bcvk pb` and `podman-bootc` as users run them, against a test:/// node file (no VM)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bcvk import pb
from bcvk.libvirt import xml as lx
from tests import schemas
from tests.conftest import BIN_DIR, Cli
from tests.unit.testdriver import domain_xml, node_file

IMAGE = "localhost/bcvk/debian-bootc:12"


def domain(name: str, info: pb.PbInfo | None, running: bool, port: int) -> str:
    md = lx.Metadata(
        source_image=IMAGE,
        ssh_port=port,
        ssh_private_key_path=f"/keys/{name}/id_ed25519",
        created=f"2026-01-0{port % 10}T00:00:00+00:00",
    )
    container = md.to_element()
    if info is not None:
        container.append(info.to_element())
    return domain_xml(name, container, running)


@pytest.fixture
def uri(tmp_path: Path) -> str:
    image_id = "8ae7e19ce1c7" + "0" * 52
    doms = [
        domain(
            "podman-bootc-8ae7e19ce1c7",
            pb.PbInfo("8ae7e19ce1c7", None, image_id, IMAGE, disk_size=10 << 30),
            running=True,
            port=2301,
        ),
        domain(
            "web",
            pb.PbInfo("8ae7aaaaaaaa", "web", image_id, IMAGE, disk_size=20 << 30),
            running=False,
            port=2302,
        ),
        domain("plain", None, running=True, port=2303),  # a bcvk libvirt VM, not pb
    ]
    return node_file(tmp_path, doms)


@pytest.fixture(autouse=True)
def runtime(tmp_path: Path) -> dict[str, str]:
    return {"XDG_RUNTIME_DIR": str(tmp_path)}


def test_list_shows_pb_vms_only(uri: str, runtime: dict[str, str], cli: Cli) -> None:
    table = cli("pb", "-c", uri, "list", env=runtime, check=True).stdout.splitlines()
    assert table[0].split() == ["ID", "REPO", "SIZE", "CREATED", "RUNNING", "SSH", "PORT", "NAME"]
    rows = [line.split() for line in table[1:]]
    assert [(r[0], r[-1]) for r in rows] == [
        ("8ae7e19ce1c7", "podman-bootc-8ae7e19ce1c7"),
        ("8ae7aaaaaaaa", "web"),
    ]
    data = json.loads(cli("pb", "-c", uri, "list", "--format", "json", env=runtime).stdout)
    schemas.check("pb-list", data)
    assert {"id", "name", "image", "running", "ssh_port", "created", "disk_size"} <= set(data[0])
    first, second = data
    assert (first["running"], first["ssh_port"], first["disk_size"]) == (True, 2301, 10 << 30)
    assert (second["name"], second["running"], second["in_use"]) == ("web", False, False)
    # `bcvk libvirt list` shows pb VMs too
    libvirt = json.loads(cli("libvirt", "-c", uri, "list", "--all", "--format", "json").stdout)
    assert {r["name"] for r in libvirt} == {"podman-bootc-8ae7e19ce1c7", "web", "plain"}


def test_inspect_by_name_and_unique_prefix(uri: str, runtime: dict[str, str], cli: Cli) -> None:
    by_name = json.loads(cli("pb", "-c", uri, "inspect", "web", env=runtime, check=True).stdout)
    assert by_name["id"] == "8ae7aaaaaaaa"
    by_prefix = json.loads(cli("pb", "-c", uri, "inspect", "8ae7e", env=runtime).stdout)
    assert by_prefix["name"] == "podman-bootc-8ae7e19ce1c7"


def test_ambiguous_and_unknown_ids(uri: str, runtime: dict[str, str], cli: Cli) -> None:
    amb = cli("pb", "-c", uri, "inspect", "8ae7", env=runtime)
    assert amb.returncode == 2
    assert "ambiguous" in amb.stderr
    assert "8ae7aaaaaaaa (web)" in amb.stderr
    assert "8ae7e19ce1c7 (podman-bootc-8ae7e19ce1c7)" in amb.stderr
    for args in (["stop", "zzz"], ["rm", "zzz"], ["ssh", "zzz", "--", "true"], ["start", "zzz"]):
        result = cli("pb", "-c", uri, *args, env=runtime)
        assert result.returncode == 1, args
        assert "no podman-bootc VM 'zzz'" in result.stderr
    plain = cli("pb", "-c", uri, "inspect", "plain", env=runtime)
    assert plain.returncode == 1  # a libvirt VM that is not a pb VM


def test_rm_needs_force_for_running_and_ssh_needs_running(
    uri: str, runtime: dict[str, str], cli: Cli
) -> None:
    running = cli("pb", "-c", uri, "rm", "8ae7e", env=runtime)
    assert running.returncode == 1
    assert "is running" in running.stderr
    assert "-f" in running.stderr
    stopped = cli("pb", "-c", uri, "ssh", "web", "--", "true", env=runtime)
    assert stopped.returncode == 1
    assert "not running" in stopped.stderr
    assert "bcvk pb start 8ae7aaaaaaaa" in stopped.stderr
    both = cli("pb", "-c", uri, "rm", "--all", "web", env=runtime)
    assert both.returncode == 2


def test_run_flag_errors_need_no_libvirt(tmp_path: Path, runtime: dict[str, str], cli: Cli) -> None:
    rm_bg = cli("pb", "run", "--rm", "-B", IMAGE, env=runtime)
    assert rm_bg.returncode == 2
    assert "--rm cannot be combined with -B" in rm_bg.stderr
    (tmp_path / "ci").mkdir()
    no_user_data = cli("pb", "run", "--cloudinit", str(tmp_path / "ci"), IMAGE, env=runtime)
    assert no_user_data.returncode == 2
    assert "has no user-data file" in no_user_data.stderr
    bad_port = cli("pb", "run", "-p", "80:x", IMAGE, env=runtime)
    assert bad_port.returncode == 2
    assert "'x' is not a port" in bad_port.stderr


def test_podman_bootc_entry_point(uri: str, runtime: dict[str, str]) -> None:
    script = BIN_DIR / "podman-bootc"

    helped = subprocess.run([script, "--help"], capture_output=True, text=True, check=True)
    assert helped.stdout.startswith("Usage: podman-bootc [OPTIONS] COMMAND")
    for command in ("run", "ssh", "list", "stop", "start", "rm", "images", "completion"):
        assert f"  {command} " in helped.stdout
    listed = subprocess.run(
        [script, "-c", uri, "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
        env={**__import__("os").environ, **runtime},
    )
    assert len(json.loads(listed.stdout)) == 2
    assert listed.stderr == ""  # podman-bootc's default log level is warn
    removed = subprocess.run(
        [script, "--log-level", "error", "-c", uri, "remove", "zzz"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert removed.returncode == 1  # the alias exists and reaches the error boundary
    assert "error: no podman-bootc VM 'zzz'" in removed.stderr
    completion = subprocess.run(
        [script, "completion", "bash"], capture_output=True, text=True, check=True
    )
    assert "_PODMAN_BOOTC_COMPLETE" in completion.stdout


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["ssh", "--", "echo", "latest"], (None, ["echo", "latest"], None)),
        (["ssh", "ID", "--", "echo", "--", "x"], ("ID", ["echo", "--", "x"], None)),
        (["ssh", "-u", "root", "ID", "--", "id"], ("ID", ["id"], "root")),
        (["ssh", "ID", "ls", "-la"], ("ID", ["ls", "-la"], None)),
        (["ssh"], (None, [], None)),
        (["ssh", "-u", "core", "--", "true"], (None, ["true"], "core")),
        (["run", "-B", "IMG", "--", "sh", "-c", "exit 3"], ("IMG", ["sh", "-c", "exit 3"], None)),
        (["run", "IMG", "ls", "-la", "/"], ("IMG", ["ls", "-la", "/"], None)),
    ],
)
def test_id_and_command_parsing(
    argv: list[str],
    expected: tuple[str | None, list[str], str | None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bcvk.cli import pb as cli

    seen: list[tuple[str | None, list[str], str | None]] = []

    def session(ref: str | None, args: list[str], user: str | None = None, **_: object) -> int:
        seen.append((ref, list(args), user))
        return 0

    def run_session(ref: str, opts: object, args: list[str], **_: object) -> tuple[object, int]:
        seen.append((ref, list(args), None))
        return pb.PbVm.__new__(pb.PbVm), 0

    monkeypatch.setattr(pb, "ssh_session", session)
    monkeypatch.setattr(pb, "run_session", run_session)
    monkeypatch.setattr(pb.PbVm, "id", property(lambda self: "0123456789ab"))
    assert cli.pb.main(argv, standalone_mode=False) == 0
    assert seen == [expected]
