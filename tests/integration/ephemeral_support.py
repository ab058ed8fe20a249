"""Shared machinery for the ephemeral VM integration tests.

Leak checks here are exact rather than global, because other VMs may run on
the same host: every bcvk a test starts carries ``BCVK_TEST_MARK=<token>`` in
its environment, which all its children inherit, so "processes left behind"
means processes whose environment holds the token.  Image mounts are counted
per layer in podman's ``mountpoints.json`` (a second VM of the same image
holds its own count).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import as_user, bcvk, bcvk_popen

# Boots under TCG on a busy 2-core host can take minutes; the default of
# 240 s is the product's, not the test suite's.
SSH_TIMEOUT = os.environ.get("BCVK_TEST_SSH_TIMEOUT", "900")


def marked_processes(token: str) -> list[str]:
    """Command lines of live processes whose environment carries TOKEN."""
    needle = f"BCVK_TEST_MARK={token}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle not in (proc / "environ").read_bytes():
                continue
            stat = (proc / "stat").read_text()
            if stat[stat.rfind(")") + 2] == "Z":
                continue
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found.append(f"{proc.name}: {cmdline.strip()}")
    return found


def _podman(user: str | None, *args: str) -> list[str]:
    argv = ["podman", *args]
    return as_user(user, argv) if user else argv


@functools.cache  # podman's run root does not move during a test run (0.3 s a call)
def run_root(user: str | None) -> Path:
    out = subprocess.run(
        _podman(user, "info", "--format", "{{.Store.RunRoot}}"),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return Path(out)


def layer_of(image: str, user: str | None = None) -> str:
    """The top layer of IMAGE (what `podman image mount` mounts)."""
    out = subprocess.run(
        _podman(user, "image", "inspect", "--format", "json", image),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    data = json.loads(out)[0]
    return str(data["Id"])


def mount_counts(user: str | None = None) -> dict[str, int]:
    """Mount counts per layer id, as podman's storage records them."""
    counts: dict[str, int] = {}
    base = run_root(user)
    for path in base.glob("*-layers/mountpoints.json"):
        try:
            if user is None:
                text = path.read_text()
            else:
                text = subprocess.run(
                    as_user(user, ["cat", str(path)]), capture_output=True, text=True, check=False
                ).stdout
            for entry in json.loads(text or "[]"):
                counts[entry["id"]] = counts.get(entry["id"], 0) + int(entry.get("count", 0))
        except (OSError, ValueError):
            continue
    return counts


@dataclass
class Session:
    """One test's view: its marker, runtime dir and the state to compare against."""

    token: str
    runtime: Path  # XDG_RUNTIME_DIR given to bcvk (root tests)
    user: str | None = None
    mounts_before: dict[str, int] = field(default_factory=dict)

    @property
    def ephemeral_dir(self) -> Path:
        if self.user is not None:
            return runtime_dir_for(self.user) / "ephemeral"
        return self.runtime / "bcvk" / "ephemeral"

    @property
    def env(self) -> dict[str, str]:
        env = {"BCVK_TEST_MARK": self.token}
        if self.user is None:
            env["XDG_RUNTIME_DIR"] = str(self.runtime)
        return env

    def bcvk(
        self, *args: str, timeout: float = 1800, check: bool = False, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return bcvk(*args, env=self.env, user=self.user, timeout=timeout, check=check, input=input)

    def popen(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return bcvk_popen(*args, env={**self.env, **(env or {})}, user=self.user)

    def wait_for_phase(self, name: str, phase: str, timeout: float = 180) -> dict[str, Any]:
        """The VM's record once it reaches PHASE (starting → running → stopping)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.vm_record(name) or {}
            if record.get("phase") == phase:
                return record
            time.sleep(0.1)
        raise AssertionError(f"{name} never reached {phase}; record: {self.vm_record(name)}")

    def wait_for_processes(
        self, name: str, roles: set[str], timeout: float = 180
    ) -> dict[str, Any]:
        """The VM's record once it lists processes with all ROLES."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.vm_record(name) or {}
            have = {"qemu"} if record.get("qemu") else set()
            have |= {h["role"] for h in record.get("helpers") or []}
            if roles <= have:
                return record
            time.sleep(0.2)
        raise AssertionError(f"{roles} of {name} did not start; record: {self.vm_record(name)}")

    def state_dirs(self) -> list[str]:
        base = self.ephemeral_dir
        if self.user is not None:
            out = subprocess.run(
                as_user(self.user, ["sh", "-c", f"ls {base} 2>/dev/null || true"]),
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            return out.split()
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def vm_record(self, name: str) -> dict[str, Any] | None:
        path = self.ephemeral_dir / name / "vm.json"
        try:
            data = json.loads(path.read_text())
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def leftovers(self, wait: float = 15.0) -> list[str]:
        """Everything a finished bcvk should not have left (empty when clean)."""
        deadline = time.monotonic() + wait
        while True:
            problems = [f"process left: {p}" for p in marked_processes(self.token)]
            problems += [f"state dir left: {d}" for d in self.state_dirs()]
            after = mount_counts(self.user)
            problems += [
                f"image mount left: layer {layer[:12]} count {self.mounts_before.get(layer, 0)}"
                f" -> {count}"
                for layer, count in after.items()
                if count > self.mounts_before.get(layer, 0)
            ]
            if not problems or time.monotonic() > deadline:
                return problems
            time.sleep(0.5)


def runtime_dir_for(user: str) -> Path:
    """The runtime dir bcvk picks for USER (no XDG_RUNTIME_DIR in its environment)."""
    uid = int(subprocess.run(["id", "-u", user], capture_output=True, text=True).stdout)
    run_user = Path(f"/run/user/{uid}")
    return run_user / "bcvk" if run_user.is_dir() else Path(f"/tmp/bcvk-{uid}")


@pytest.fixture(name="session")
def session_fixture(tmp_path: Path) -> Iterator[Session]:
    """A private runtime dir and marker for one test; import it to use it."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    s = Session(token=secrets.token_hex(6), runtime=runtime, mounts_before=mount_counts())
    yield s
    # Whatever a failed test left, do not let it linger on a shared host.
    for line in marked_processes(s.token):
        pid = int(line.split(":", 1)[0])
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
    for name in s.state_dirs():
        s.bcvk("ephemeral", "rm", "-f", name, timeout=120)


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def ssh_args(extra: Sequence[str] = ()) -> list[str]:
    return ["--ssh-timeout", SSH_TIMEOUT, *extra]
