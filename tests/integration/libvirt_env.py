"""Shared set-up for the libvirt integration tests: daemons, names, virsh probes.

libvirtd and virtlogd are started here when they are not running (these
hosts have no systemd); they are left running afterwards, and daemons this
code did not start are never stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

URI = "qemu:///system"
LABEL = "bcvk-integration"
POOL_DIR = Path("/var/lib/libvirt/images")


def _alive(pidfile: Path) -> bool:
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def ensure_daemons() -> list[str]:
    """Start virtlogd and libvirtd (as root) unless their pidfiles name live processes."""
    if os.geteuid() != 0:
        pytest.skip("qemu:///system tests need root")
    started: list[str] = []
    for name, pidfile in (("virtlogd", "/run/virtlogd.pid"), ("libvirtd", "/run/libvirtd.pid")):
        if _alive(Path(pidfile)):
            continue
        binary = shutil.which(name) or f"/usr/sbin/{name}"
        if not Path(binary).exists():
            pytest.skip(f"{name} is not installed")
        subprocess.run([binary, "-d"], check=True)
        started.append(name)
    deadline = time.monotonic() + 30
    while True:
        probe = subprocess.run(
            ["virsh", "-c", URI, "version"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return started
        if time.monotonic() > deadline:
            raise AssertionError(f"libvirtd did not come up: {probe.stderr}")
        time.sleep(0.2)


def virsh(*args: str, uri: str = URI, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True, check=check)


def domain_names(uri: str = URI) -> set[str]:
    out = virsh("list", "--all", "--name", uri=uri).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def domstate(name: str) -> str:
    return virsh("domstate", name).stdout.strip()


def volumes() -> set[str]:
    listed = virsh("vol-list", "default", check=False)
    if listed.returncode != 0:
        # On a fresh host the pool exists only once bcvk's first VM made it.
        assert "not found" in listed.stderr, listed.stderr
        return set()
    return {line.split()[0] for line in listed.stdout.splitlines()[2:] if line.strip()}


def backing_file(path: str | Path) -> str | None:
    info = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", os.fspath(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(info.stdout)
    value = data.get("full-backing-filename") or data.get("backing-filename")
    return str(value) if value else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cleanup(prefix: str, uri: str = URI) -> None:
    """Remove every domain and volume whose name starts with PREFIX (test leftovers)."""
    for name in domain_names(uri):
        if name.startswith(prefix):
            virsh("destroy", name, uri=uri, check=False)
            virsh("undefine", name, "--nvram", "--tpm", uri=uri, check=False)
    for vol in volumes():
        if vol.startswith(prefix):
            virsh("vol-delete", "--pool", "default", vol, uri=uri, check=False)
