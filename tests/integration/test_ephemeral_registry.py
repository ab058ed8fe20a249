"""Pulling from a real registry on 127.0.0.1 (Debian's docker-registry) over verified TLS."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DEMO_IMAGE, have, image_exists
from tests.integration.ephemeral_support import (
    Session,
    session_fixture,  # noqa: F401  (fixture)
    unique,
)

CERTS_D = Path("/etc/containers/certs.d")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


pytestmark = pytest.mark.usefixtures("no_leaks")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A TLS registry on 127.0.0.1 holding the demo image; yields (host:port, ca.crt)."""
    if not have("docker-registry") or not have("openssl"):
        pytest.skip("needs docker-registry and openssl (scripts/setup-host.sh)")
    if os.geteuid() != 0 or not image_exists(DEMO_IMAGE):
        pytest.skip(f"needs root and {DEMO_IMAGE}")
    work = tmp_path_factory.mktemp("registry")
    port = free_port()
    host = f"127.0.0.1:{port}"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(work / "key.pem"), "-out", str(work / "cert.pem"),
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        capture_output=True, check=True,
    )  # fmt: skip
    (work / "config.yml").write_text(
        "version: 0.1\n"
        f"storage:\n  filesystem:\n    rootdirectory: {work / 'data'}\n"
        f"http:\n  addr: {host}\n  tls:\n"
        f"    certificate: {work / 'cert.pem'}\n    key: {work / 'key.pem'}\n"
    )
    log = (work / "registry.log").open("w")
    server = subprocess.Popen(
        ["docker-registry", "serve", str(work / "config.yml")], stdout=log, stderr=log
    )
    trust = CERTS_D / host
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert server.poll() is None, (work / "registry.log").read_text()
            assert time.monotonic() < deadline, "the registry did not start listening"
            time.sleep(0.1)
        trust.mkdir(parents=True)
        shutil.copy(work / "cert.pem", trust / "ca.crt")
        subprocess.run(
            ["podman", "push", "-q", DEMO_IMAGE, f"{host}/bcvk/demo:1"],
            capture_output=True,
            check=True,
            timeout=900,
        )
        yield host, trust / "ca.crt"
    finally:
        shutil.rmtree(trust, ignore_errors=True)
        server.terminate()
        server.wait(timeout=10)
        log.close()
        subprocess.run(["podman", "rmi", "-f", f"{host}/bcvk/demo:1"], capture_output=True)


def test_untrusted_certificate_is_refused(registry: tuple[str, Path], session: Session) -> None:
    host, ca = registry
    hidden = ca.with_name("ca.crt.off")
    ca.rename(hidden)
    try:
        result = session.bcvk("ephemeral", "run", "-d", "--pull", "always", f"{host}/bcvk/demo:1")
    finally:
        hidden.rename(ca)
    assert result.returncode == 1
    assert "could not be pulled" in result.stderr
    assert session.leftovers() == []


def test_pull_from_registry_then_start(registry: tuple[str, Path], session: Session) -> None:
    host, _ = registry
    ref = f"{host}/bcvk/demo:1"
    subprocess.run(["podman", "rmi", "-f", ref], capture_output=True)
    name = unique("pulled")
    result = session.bcvk("ephemeral", "run", "-d", "--name", name, ref)  # --pull missing
    assert result.returncode == 0, result.stderr
    assert image_exists(ref)
    assert session.bcvk("ephemeral", "rm", "-f", name).returncode == 0
    assert session.leftovers() == []
