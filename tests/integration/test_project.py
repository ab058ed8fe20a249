"""`bcvk up | status | down` on a real bcvk.toml: real libvirtd, QEMU (TCG) and SSH.

Two VMs of the demo image boot together (boot 1 and 2), one of them is
recreated with more memory (boot 3) while the other is stopped; the refusal
paths (a bad value, a hand-made domain of the same name) boot nothing.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import schemas
from tests.conftest import DEMO_IMAGE, bcvk, image_exists
from tests.integration import libvirt_env as env

PREFIX = f"bcvk-pt-{uuid.uuid4().hex[:6]}"
WEB, DB = f"{PREFIX}-web", f"{PREFIX}-db"
BOOT_TIMEOUT = "900"  # seconds; two TCG guests at once on a shared 2-core host


@dataclass
class Files:
    dir: Path
    ports: dict[str, int]

    @property
    def path(self) -> Path:
        return self.dir / "bcvk.toml"

    def write(self, web_memory: str) -> None:
        self.path.write_text(
            f'[defaults]\nimage = "{DEMO_IMAGE}"\nmemory = "1G"\nvcpus = 1\n'
            f'connect = "{env.URI}"\nlabel = ["{env.LABEL}"]\n\n'
            f'[vm.{WEB}]\nmemory = "{web_memory}"\nport = ["{self.ports[WEB]}:80"]\n\n'
            f'[vm.{DB}]\nport = ["{self.ports[DB]}:5432"]\n'
        )

    def run(self, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
        verb, *rest = args
        return bcvk(verb, "-f", str(self.path), *rest, timeout=timeout)

    def ok(self, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
        result = self.run(*args, timeout=timeout)
        assert result.returncode == 0, f"bcvk {' '.join(args)}:\n{result.stderr}"
        return result

    def status(self) -> dict[str, dict[str, object]]:
        rows = schemas.check(
            "project-status", json.loads(self.ok("status", "--format", "json").stdout)
        )
        return {str(r["name"]): r for r in rows}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Files]:
    env.ensure_daemons()
    if not image_exists(DEMO_IMAGE):
        pytest.skip(f"{DEMO_IMAGE} not built (run `make images`)")
    made = Files(tmp_path_factory.mktemp("project"), {WEB: env.free_port(), DB: env.free_port()})
    made.write("1G")
    yield made
    env.cleanup(PREFIX)
    left = {n for n in env.domain_names() if n.startswith(PREFIX)}
    assert not left, f"domains left behind: {left}"


def test_a_bad_value_creates_nothing(files: Files) -> None:
    bad = files.dir / "bad" / "bcvk.toml"
    bad.parent.mkdir()
    bad.write_text(files.path.read_text().replace('memory = "1G"', 'memory = "lots"', 1))
    result = bcvk("up", "-f", str(bad))
    assert result.returncode == 2
    assert result.stderr.startswith("error: bcvk.toml:3: defaults.memory: invalid memory 'lots'")
    assert len(result.stderr.splitlines()) == 2  # the error and its hint
    assert not {n for n in env.domain_names() if n.startswith(PREFIX)}


def test_a_hand_made_domain_of_the_same_name_is_refused_and_left_alone(files: Files) -> None:
    hand = files.dir / "hand.xml"
    hand.write_text(
        f"<domain type='qemu'><name>{WEB}</name><memory unit='MiB'>64</memory>"
        "<os><type arch='x86_64' machine='q35'>hvm</type></os></domain>"
    )
    env.virsh("define", str(hand))
    try:
        assert files.status()[WEB]["sync"] == "foreign"
        refused = files.run("up")
        assert refused.returncode == 1
        assert f"a domain named '{WEB}' exists that was not created from {files.path}" in (
            refused.stderr
        )
        assert DB not in env.domain_names()  # refused as a whole: db was not created either
        down = files.ok("down", "--rm")
        assert f"{WEB}: left alone" in down.stdout.splitlines()
        assert env.domstate(WEB) == "shut off"  # still there, untouched
    finally:
        env.virsh("undefine", WEB, check=False)


def guest(files: Files, name: str, command: str) -> str:
    return files.ok("ssh", name, "--", command, timeout=300).stdout


def test_up_ssh_wait_brings_both_vms_up_in_sync(files: Files) -> None:
    up = files.ok("up", "--ssh-wait", "--timeout", BOOT_TIMEOUT)
    assert up.stdout.splitlines() == [f"{WEB}: created", f"{DB}: created"]
    rows = files.status()
    for name in (WEB, DB):
        assert (rows[name]["sync"], rows[name]["state"]) == ("in sync", "running")
        assert env.domstate(name) == "running"
        # What the guest reports: the file's vcpus and its own forwarded port.
        assert guest(files, name, "nproc").strip() == "1"
    assert rows[WEB]["ssh_port"] != rows[DB]["ssh_port"]
    listeners = subprocess.run(["ss", "-Htln"], capture_output=True, text=True).stdout
    for port in files.ports.values():
        assert f"127.0.0.1:{port}" in listeners


def test_a_changed_value_differs_and_up_refuses_without_recreate(files: Files) -> None:
    uuid_before = env.virsh("domuuid", WEB).stdout.strip()
    files.write("1536M")
    rows = files.status()
    assert rows[WEB]["sync"] == "differs"
    assert rows[WEB]["differences"] == ["memory 1.0 GiB → 1.5 GiB"]
    assert rows[DB]["sync"] == "in sync"
    refused = files.run("up")
    assert refused.returncode == 1
    assert f"bcvk up --recreate {WEB}" in refused.stderr
    assert env.virsh("domuuid", WEB).stdout.strip() == uuid_before
    assert env.domstate(WEB) == "running"


def test_up_recreate_applies_the_new_memory(files: Files) -> None:
    # db is stopped first so that web's second boot has the host to itself.
    assert files.ok("down", DB).stdout.splitlines() == [f"{DB}: stopped"]
    assert env.domstate(DB) == "shut off"
    up = files.ok("up", "--recreate", "--ssh-wait", "--timeout", BOOT_TIMEOUT, WEB)
    assert up.stdout.splitlines() == [f"{WEB}: recreated"]
    total_mib = int(guest(files, WEB, "free -m | awk '/^Mem:/ {print $2}'"))
    assert 1200 < total_mib <= 1536  # 1 GiB before; the kernel keeps a little
    assert files.status()[WEB]["sync"] == "in sync"


def test_down_rm_leaves_no_domain_disk_or_key(files: Files) -> None:
    inspected = {
        name: json.loads(bcvk("libvirt", "-c", env.URI, "inspect", name, "--format", "json").stdout)
        for name in (WEB, DB)
    }
    down = files.ok("down", "--rm")
    assert down.stdout.splitlines() == [f"{WEB}: removed", f"{DB}: removed"]
    assert not {n for n in env.domain_names() if n.startswith(PREFIX)}
    assert not {v for v in env.volumes() if v.startswith(PREFIX)}
    for info in inspected.values():
        assert not Path(str(info["disk_path"])).exists()
        assert not Path(str(info["ssh_private_key_path"])).parent.exists()
    assert {r["sync"] for r in files.status().values()} == {"missing"}
