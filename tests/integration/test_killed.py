"""SIGKILL at any moment: the next command leaves the host as if bcvk never ran.

SIGKILL skips every ``finally``.  What a killed bcvk leaves is recorded as it
goes (to-disk's run records, the VM-creation journal, the ephemeral
registry), and the next command of the same kind, or a listing, undoes it.
Each test kills bcvk at a named point, checks that something *was* left at
that point (so the test can fail), runs the next command and checks that
nothing is left: no process, image mount, work directory, record, domain,
volume or key.

None of these waits for a guest to finish booting: each kill comes while the
guest (if any) is still early in its boot.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import DEMO_IMAGE, ROOT, bcvk, bcvk_popen, image_exists
from tests.integration import libvirt_env as env
from tests.integration.ephemeral_support import marked_processes, mount_counts

PREFIX = f"bcvk-kill-{secrets.token_hex(3)}"
INSTALLER = "localhost/bcvk/fixture-bootc-installer:latest"
KEYS = Path.home() / ".local" / "share" / "bcvk" / "libvirt"


@dataclass
class Run:
    """One bcvk to be killed, with its own marker and runtime directory."""

    token: str
    runtime: Path
    out: Path
    mounts_before: dict[str, int]

    @property
    def env(self) -> dict[str, str]:
        return {"BCVK_TEST_MARK": self.token, "XDG_RUNTIME_DIR": str(self.runtime)}

    def start(self, *args: str) -> subprocess.Popen[str]:
        return bcvk_popen(*args, env=self.env)

    def bcvk(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return bcvk(*args, env=self.env, timeout=timeout)

    def new_mounts(self) -> list[str]:
        return [
            layer
            for layer, count in mount_counts().items()
            if count > self.mounts_before.get(layer, 0)
        ]

    def records(self) -> list[str]:
        base = self.runtime / "bcvk"
        found = [p.name for p in base.glob("to-disk-*.json")] if base.is_dir() else []
        vms = base / "ephemeral"
        found += [p.name for p in vms.iterdir() if p.is_dir()] if vms.is_dir() else []
        return found


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    if not image_exists(DEMO_IMAGE):
        pytest.fail(f"{DEMO_IMAGE} not built (run `make images`)")
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    out = tmp_path / "out"
    out.mkdir()
    r = Run(secrets.token_hex(6), runtime, out, mount_counts())
    yield r
    for line in marked_processes(r.token):  # a failed test must not leave its VM running
        subprocess.run(["kill", "-9", line.split(":", 1)[0]], check=False)


def wait_until(what: str, ready: Callable[[], bool], proc: subprocess.Popen[str],
               timeout: float = 600) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"bcvk exited ({proc.returncode}) before {what}:\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def kill(proc: subprocess.Popen[str], token: str) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    # Children die by their parent-death signal; give them a moment.
    deadline = time.monotonic() + 20
    while marked_processes(token) and time.monotonic() < deadline:
        time.sleep(0.2)


def work_dirs(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if ".bcvk-" in p.name)


def run_record(runtime: Path) -> dict[str, object] | None:
    for path in (runtime / "bcvk").glob("to-disk-*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        return data if isinstance(data, dict) else None
    return None


def _building(out: Path) -> bool:
    for work in out.glob(".*.bcvk-*"):
        if any(f.is_file() and f.stat().st_size > 1 << 20 for f in work.rglob("*")):
            return True
    return False


# ------------------------------------------------------------------ to-disk


@pytest.mark.parametrize("point", ["image mounted", "disk being built"])
def test_killed_to_disk_is_undone_by_the_next(run: Run, point: str) -> None:
    target = run.out / "disk.raw"
    proc = run.start("to-disk", DEMO_IMAGE, str(target))
    if point == "image mounted":
        wait_until(point, lambda: (run_record(run.runtime) or {}).get("mount_state") == "mounted",
                   proc)  # fmt: skip
    else:
        wait_until(point, lambda: _building(run.out), proc)
    kill(proc, run.token)
    # What SIGKILL left at that point: the work dir, the mount, the record.
    assert work_dirs(run.out) != []
    assert run.new_mounts() != []
    assert run.records() != []
    assert not target.exists()

    nxt = run.bcvk("to-disk", DEMO_IMAGE, str(run.out / "other.raw"), "--dry-run")
    assert nxt.returncode == 0, nxt.stderr
    assert "interrupted" in nxt.stderr
    assert work_dirs(run.out) == []
    assert run.new_mounts() == []
    assert run.records() == []
    assert marked_processes(run.token) == []
    assert sorted(p.name for p in run.out.iterdir()) == []


@pytest.fixture(scope="module")
def installer_image() -> str:
    subprocess.run([ROOT / "scripts" / "build-installer-fixture.sh"], check=True)
    return INSTALLER


def test_killed_bootc_install_is_undone_by_the_next(run: Run, installer_image: str) -> None:
    target = run.out / "disk.raw"
    proc = run.start("to-disk", installer_image, str(target))
    vms = run.runtime / "bcvk" / "ephemeral"

    def installer_vm_running() -> bool:
        for record in vms.glob("*/vm.json"):
            try:
                if json.loads(record.read_text()).get("phase") == "running":
                    return True
            except (OSError, ValueError):
                continue
        return False

    wait_until("the installer VM is booting", installer_vm_running, proc)
    kill(proc, run.token)
    assert marked_processes(run.token) == []  # QEMU went with bcvk (parent-death signal)
    assert work_dirs(run.out) != []
    assert run.records() != []

    nxt = run.bcvk("to-disk", installer_image, str(run.out / "other.raw"), "--dry-run")
    assert nxt.returncode == 0, nxt.stderr
    assert work_dirs(run.out) == []
    assert run.records() == []
    assert run.new_mounts() == []
    assert sorted(p.name for p in run.out.iterdir()) == []


# ------------------------------------------------------------------ libvirt, pb


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[None]:
    env.ensure_daemons()
    yield
    env.cleanup(PREFIX)


def vm_volumes() -> set[str]:
    """Volumes other than base disks: a finished base disk is a cache, kept by design
    (``libvirt base-disks prune`` removes unused ones); a half-built one is not."""
    return {v for v in env.volumes() if not v.startswith("bootc-base-")}


def keys() -> set[str]:
    return {p.name for p in KEYS.iterdir()} if KEYS.is_dir() else set()


def pool_work_dirs() -> list[str]:
    return work_dirs(env.POOL_DIR)


def _domain_state(name: str) -> str:
    return env.virsh("domstate", name, check=False).stdout.strip()


@pytest.mark.parametrize("point", ["base disk being built", "guest booting"])
def test_killed_libvirt_run_is_undone_by_the_next_listing(
    run: Run, libvirtd: None, point: str
) -> None:
    name = f"{PREFIX}-{point.split()[0]}"
    keys_before, volumes_before = keys(), vm_volumes()
    args = ["libvirt", "-c", env.URI, "run", "--name", name, "--ssh-wait", "--timeout", "900"]
    if point == "base disk being built":
        # A karg no other test uses: this run must build a base disk of its own.
        args += ["--karg", f"bcvk.killtest={secrets.token_hex(4)}"]
    proc = run.start(*args, DEMO_IMAGE)
    if point == "base disk being built":
        wait_until(point, lambda: _building(env.POOL_DIR), proc, timeout=900)
    else:
        wait_until(point, lambda: _domain_state(name) == "running", proc, timeout=900)
    kill(proc, run.token)
    left = (pool_work_dirs(), name in env.domain_names(), keys() - keys_before)
    assert left != ([], False, set()), "the kill came too late to leave anything"

    listed = run.bcvk("libvirt", "-c", env.URI, "list", "--all", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    assert name not in listed.stdout
    assert name not in env.domain_names()
    assert vm_volumes() - volumes_before == set()
    assert keys() - keys_before == set()
    assert pool_work_dirs() == []
    assert list(KEYS.glob("*pending-*")) == []
    assert run.new_mounts() == []
    assert marked_processes(run.token) == []


def test_killed_pb_run_is_undone_by_the_next_listing(run: Run, libvirtd: None) -> None:
    name = f"{PREFIX}-pb"
    keys_before, volumes_before = keys(), vm_volumes()
    proc = run.start("pb", "run", "--name", name, "--timeout", "900", DEMO_IMAGE)
    wait_until("guest booting", lambda: _domain_state(name) == "running", proc, timeout=900)
    kill(proc, run.token)
    assert name in env.domain_names()

    listed = run.bcvk("pb", "list", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    assert name not in listed.stdout
    assert name not in env.domain_names()
    assert vm_volumes() - volumes_before == set()
    assert keys() - keys_before == set()
    assert list(KEYS.glob("*pending-*")) == []
    assert run.new_mounts() == []
