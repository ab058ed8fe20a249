"""Upstream's varlink tests (varlink.rs) on our images: systemd-socket-activate
starts bcvk as varlinkctl or a socket unit would; a raw client calls it.

One VM boots (Run, restored warm when an earlier test left a snapshot): Ps
lists it, GetSshConnectionInfo reaches it with a real SSH command.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DEMO_IMAGE, bcvk_bin, image_exists
from tests.integration.ephemeral_support import (
    Session,
    session_fixture,  # noqa: F401  (fixture)
    unique,
)
from tests.varlink_client import Client


def activated(session: Session, socket_path: Path, *, accept: bool) -> subprocess.Popen[bytes]:
    """systemd-socket-activate listening on SOCKET_PATH for bcvk (no arguments)."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed")
    # It hands its children only the variables named with -E: the session's
    # runtime dir and marker, and what the CLI and coverage need.
    env = {**os.environ, **session.env}
    names = [n for n in env if n in ("PATH", "HOME", "LANG", *session.env) or n.startswith("COV")]
    passed = [a for n in names for a in ("-E", f"{n}={env[n]}")]
    argv = [activate, "-l", str(socket_path), *(["--accept"] if accept else []), *passed,
            bcvk_bin()]  # fmt: skip
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )


@pytest.fixture
def server(session: Session, tmp_path: Path) -> Iterator[Path]:
    if not image_exists(DEMO_IMAGE):
        pytest.skip(f"{DEMO_IMAGE} not built (run `make images`)")
    path = tmp_path / "bcvk.sock"
    proc = activated(session, path, accept=False)
    yield path
    # systemd-socket-activate execs bcvk in its own process: one signal ends it.
    os.killpg(proc.pid, 15)
    assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
    assert session.leftovers() == []


def test_images_list_contains_the_demo_image(server: Path) -> None:
    with Client(server) as client:
        images = client.call("io.bootc.vk.images.List")["parameters"]["images"]
    assert DEMO_IMAGE in images
    assert all(images)  # upstream's images_list: every name is non-empty


def test_a_connected_socket_is_served_until_the_peer_hangs_up(
    session: Session, tmp_path: Path
) -> None:
    path = tmp_path / "accept.sock"
    proc = activated(session, path, accept=True)
    try:
        with Client(path) as client:
            info = client.call("org.varlink.service.GetInfo")["parameters"]
            assert {"io.bootc.vk.images", "io.bootc.vk.ephemeral", "io.bootc.vk.todisk"} <= set(
                info["interfaces"]
            )
            assert client.call("io.bootc.vk.ephemeral.Ps")["parameters"]["container_ids"] == []
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
    assert session.leftovers() == []


def test_run_ps_and_a_real_ssh_command(server: Path, session: Session) -> None:
    name = unique("vl")
    with Client(server) as client:
        missing = client.call("io.bootc.vk.ephemeral.Run", image="localhost/bcvk/none:1")
        assert missing["error"] == "io.bootc.vk.ephemeral.PodmanError"
        started = client.call(
            "io.bootc.vk.ephemeral.Run", image=DEMO_IMAGE,
            opts={"name": name, "memory": "1G", "ssh_keygen": True},
        )  # fmt: skip
        assert started == {"parameters": {"container_id": name}}, started
        try:
            ids = client.call("io.bootc.vk.ephemeral.Ps")["parameters"]["container_ids"]
            assert name in ids
            info = client.call("io.bootc.vk.ephemeral.GetSshConnectionInfo", container_id=name)
            info = info["parameters"]
            assert (info["container_id"], info["user"], info["host"]) == (
                name, "root", "127.0.0.1",
            )  # fmt: skip
            key = Path(info["key_path"])
            assert key.stat().st_mode & 0o777 == 0o600
            # As upstream's test: the caller retries until sshd answers.
            argv = ["ssh", "-F", "none", "-o", "StrictHostKeyChecking=no",
                    "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5",
                    "-o", "BatchMode=yes", "-i", str(key), "-p", str(info["port"]),
                    "root@127.0.0.1", "cat /proc/sys/kernel/hostname"]  # fmt: skip
            deadline = time.monotonic() + 900
            while True:
                result = subprocess.run(argv, capture_output=True, text=True, check=False)
                if result.returncode == 0 or time.monotonic() > deadline:
                    break
                time.sleep(2)
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip()
        finally:
            session.bcvk("ephemeral", "rm", "-f", name, timeout=120)


def test_to_disk_creates_then_reuses_the_disk(server: Path, tmp_path: Path) -> None:
    target = tmp_path / "disk.raw"
    with Client(server) as client:
        bad = client.call("io.bootc.vk.todisk.ToDisk", source_image="localhost/bcvk/none:1",
                          target_disk=str(target))  # fmt: skip
        assert bad["error"] == "io.bootc.vk.todisk.Failed"
        call = {"source_image": DEMO_IMAGE, "target_disk": str(target), "disk_size": "4G"}
        made = client.call("io.bootc.vk.todisk.ToDisk", **call)
        assert made == {"parameters": {"path": str(target), "cached": False}}, made
        assert target.stat().st_size == 4 * 1024**3
        again = client.call("io.bootc.vk.todisk.ToDisk", **call)
        assert again == {"parameters": {"path": str(target), "cached": True}}
