"""`bcvk libvirt` over a remote URI: qemu+ssh://root@localhost:PORT/system.

A private sshd (own host key, own authorized key, loopback only) stands in
for a remote libvirt host.  bcvk then has to do what it does for any remote
host: stream disks into the pool through the libvirt API and reach the
guest's loopback SSH forward through the libvirt host (ProxyCommand).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DEMO_IMAGE, bcvk, image_exists
from tests.integration import libvirt_env as env

PREFIX = f"bcvk-rt-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def remote_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env.ensure_daemons()
    if not image_exists(DEMO_IMAGE):
        pytest.skip(f"{DEMO_IMAGE} not built (run `make images`)")
    sshd = Path("/usr/sbin/sshd")
    if not sshd.exists():
        pytest.skip("openssh-server is not installed")
    work = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / key)], check=True
        )
    (work / "authorized_keys").write_text((work / "client_key.pub").read_text())
    port = env.free_port()
    config = work / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {work / 'host_key'}\n"
        f"AuthorizedKeysFile {work / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        f"StrictModes no\nPidFile {work / 'sshd.pid'}\nAllowTcpForwarding yes\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    proc = subprocess.Popen([str(sshd), "-D", "-f", str(config), "-E", str(work / "sshd.log")])
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError((work / "sshd.log").read_text()) from None
                time.sleep(0.1)
        yield (f"qemu+ssh://root@localhost:{port}/system?keyfile={work / 'client_key'}&no_verify=1")
    finally:
        env.cleanup(PREFIX)
        proc.terminate()
        proc.wait(timeout=10)


def lvr(uri: str, *args: str, timeout: float = 1500) -> subprocess.CompletedProcess[str]:
    return bcvk("libvirt", "-c", uri, *args, timeout=timeout)


def test_status_over_ssh(remote_uri: str) -> None:
    result = lvr(remote_uri, "status", "--format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["uri"].startswith("qemu+ssh://")
    # no virtiofsd wrapper on a host bcvk cannot write to: guests enforce ro binds
    assert data["readonly_bind_enforcement"] in ("guest", "libvirt")


def test_upload_streams_a_disk_into_the_pool(remote_uri: str) -> None:
    name = f"{PREFIX}-upload.qcow2"
    result = lvr(remote_uri, "upload", DEMO_IMAGE, "--volume-name", name, "--disk-size", "6G")
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    try:
        assert path == env.POOL_DIR / name
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(path)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert info["format"] == "qcow2"
        assert info["virtual-size"] == 6 * 1024**3
        again = lvr(remote_uri, "upload", DEMO_IMAGE, "--volume-name", name)
        assert again.returncode == 1
        assert "already exists" in again.stderr
    finally:
        env.virsh("vol-delete", "--pool", "default", name, check=False)


def test_run_ssh_list_rm_through_the_remote_host(remote_uri: str) -> None:
    name = f"{PREFIX}-vm"
    run = lvr(
        remote_uri, "run", "--name", name, "--memory", "1536M", "--disable-tpm",
        "--ssh-wait", "--timeout", "900", DEMO_IMAGE,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = json.loads(lvr(remote_uri, "list", "--format", "json").stdout)
    row = next(r for r in rows if r["name"] == name)
    assert row["ssh_proxy_jump"].startswith("root@localhost:")
    result = lvr(remote_uri, "ssh", name, "--", "cat", "/etc/os-release")
    assert result.returncode == 0, result.stderr
    assert "ID=debian" in result.stdout
    removed = lvr(remote_uri, "rm", "-f", name)
    assert removed.returncode == 0, removed.stderr
    assert name not in env.domain_names()
    assert f"{name}.qcow2" not in env.volumes()
