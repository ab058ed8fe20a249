"""`bcvk pb` end to end: podman-bootc's e2e scenarios on real libvirtd, QEMU (TCG) and SSH.

The steps build on each other, as podman-bootc's own e2e suite does, and
boot five guests in all:

1. fresh `run` (boot 1): disk + VM, a session, the VM survives the session;
   `ssh` opens new sessions; `stop` keeps domain and disk; `rm` removes them.
2. `run` again (boot 2) recreates the VM and keeps its session open: `rm -f`
   and `stop` are refused while it is open.
3. two more VMs (boots 3 and 4, in parallel): one idle with --cloudinit,
   --volume and --port; one killed behind bcvk's back (list shows it
   stopped).  `list`
   shows the three states; `rm -f --all` removes all but the one in use;
   after the session closes `rm -f` removes it.
4. `run --rm IMAGE CMD` (boot 5) exits with CMD's status and leaves no VM.

Failure paths that need no boot run first.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import schemas
from tests.conftest import DEMO_IMAGE, FIXTURES, bcvk, bcvk_bin, image_exists
from tests.integration import libvirt_env as env

PREFIX = f"pbit-{uuid.uuid4().hex[:6]}"
TIMEOUT = "900"  # seconds for SSH; TCG on a shared 2-core host
MEMORY = "1536"


def pb(
    *args: str, timeout: float = 1800, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return bcvk("pb", *args, timeout=timeout, input=input)


def pb_ok(
    *args: str, timeout: float = 1800, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    result = pb(*args, timeout=timeout, input=input)
    assert result.returncode == 0, (
        f"bcvk pb {' '.join(args)} ({result.returncode}):\n{result.stderr}"
    )
    return result


def listing() -> dict[str, dict[str, object]]:
    rows = schemas.check("pb-list", json.loads(pb_ok("list", "--format", "json").stdout))
    return {str(r["name"]): r for r in rows}


def demo_id() -> str:
    out = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", DEMO_IMAGE],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return out.strip()[:12]


def ssh_masters(vm_id: str) -> list[str]:
    """Command lines of shared-connection ssh processes for VM_ID."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "ControlPersist" in cmd and f"/{vm_id}-" in cmd:
            found.append(cmd)
    return found


def pool_volumes() -> set[str]:
    return env.volumes()


class Session:
    """`bcvk pb run|ssh` with its stdin left open: a session that holds the VM's lock."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [bcvk_bin(), "pb", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self.err: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line.rstrip("\n"))

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def wait_for(self, marker: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.lines:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"no {marker!r} from the session (exit {self.proc.poll()}):\n"
                    + "\n".join(self.err[-30:])
                )
            time.sleep(0.5)

    def close(self, timeout: float = 120) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(timeout=timeout)


@pytest.fixture(scope="module")
def state() -> Iterator[dict[str, object]]:
    env.ensure_daemons()
    if not image_exists(DEMO_IMAGE):
        pytest.skip(f"{DEMO_IMAGE} not built (run `make images`)")
    vm_id = demo_id()
    own = f"podman-bootc-{vm_id}"
    assert own not in env.domain_names(), f"a pb VM of {DEMO_IMAGE} exists already; remove it"
    data: dict[str, object] = {"id": vm_id, "domain": own, "sessions": []}
    yield data
    for session in data["sessions"]:  # type: ignore[attr-defined]
        if session.proc.poll() is None:
            session.proc.kill()
            session.proc.wait()
    for name, row in listing().items():
        if name == own or name.startswith(PREFIX):
            pb("rm", "-f", str(row["id"]))
    env.cleanup(PREFIX)
    env.cleanup(own)
    left = {n for n in env.domain_names() if n == own or n.startswith(PREFIX)}
    assert not left, f"domains left behind: {left}"
    assert not ssh_masters(vm_id), "shared SSH connections left behind"


# ------------------------------------------------------------------ no boot


def test_failures_that_need_no_vm(state: dict[str, object], tmp_path: Path) -> None:
    unknown = pb("ssh", "ffffffffffff", "--", "true")
    assert unknown.returncode == 1
    assert "no podman-bootc VM 'ffffffffffff'" in unknown.stderr
    assert pb("rm", "-f", "nope").returncode == 1
    if image_exists(FIXTURES["not-bootc"]):
        not_bootc = pb("run", "-B", FIXTURES["not-bootc"])
        assert not_bootc.returncode == 1
        assert "not a bootc image" in not_bootc.stderr
    empty = tmp_path / "ci"
    empty.mkdir()
    no_ud = pb("run", "--cloudinit", str(empty), DEMO_IMAGE)
    assert no_ud.returncode == 2
    assert "has no user-data file" in no_ud.stderr
    rm_bg = pb("run", "--rm", "-B", DEMO_IMAGE)
    assert rm_bg.returncode == 2
    assert "--rm cannot be combined with -B" in rm_bg.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        conflict = pb("run", "-B", "--name", f"{PREFIX}-busy", "-p", f"{port}:80", DEMO_IMAGE)
    assert conflict.returncode == 1
    assert f"port {port} is already in use" in conflict.stderr
    assert f"{PREFIX}-busy" not in env.domain_names()
    assert pb("rm", "-f", "--all").returncode == 0  # nothing to remove: a no-op


# ------------------------------------------------------------------ scenario 1 (boot 1)


def test_fresh_run_creates_disk_and_vm_and_keeps_it_after_the_session(
    state: dict[str, object],
) -> None:
    vm_id = str(state["id"])
    result = pb(
        "run", "--memory", MEMORY, "--timeout", TIMEOUT, DEMO_IMAGE,
        input="echo hello-from-$(hostname)-$((6*7))\nexit\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "hello-from-" in result.stdout
    assert "-42" in result.stdout
    assert env.domstate(str(state["domain"])) == "running"  # survives the session
    assert f"{state['domain']}.qcow2" in pool_volumes()
    rows = listing()
    row = rows[str(state["domain"])]
    assert row["id"] == vm_id
    assert row["running"] is True
    assert row["in_use"] is False
    assert isinstance(row["ssh_port"], int)
    assert row["disk_size"] == 10 * 1024**3
    assert row["image"] == DEMO_IMAGE
    base = str(row["base_disk"])
    assert base.startswith("bootc-base-")
    assert base in pool_volumes()
    state["base"] = base
    state["disk"] = row["disk_path"]
    libvirt_rows = json.loads(bcvk("libvirt", "list", "--format", "json").stdout)
    assert str(state["domain"]) in {r["name"] for r in libvirt_rows}


def test_ssh_opens_new_sessions_fast_through_a_shared_connection(
    state: dict[str, object],
) -> None:
    vm_id = str(state["id"])
    os_release = pb_ok("ssh", vm_id, "--", "cat", "/etc/os-release")
    assert "ID=debian" in os_release.stdout
    assert pb("ssh", vm_id[:5], "--", "sh", "-c", "exit 7").returncode == 7
    assert pb_ok("ssh", "--", "echo", "latest").stdout.strip() == "latest"
    assert pb_ok("ssh", "-u", "root", vm_id, "--", "id", "-un").stdout.strip() == "root"
    interactive = pb_ok("ssh", vm_id, input="echo piped-$((1+1))\n")
    assert "piped-2" in interactive.stdout
    assert ssh_masters(vm_id), "no shared SSH connection"
    # Through the shared connection (bench/pb.py measures how much faster it is).
    fast = pb_ok("ssh", vm_id, "--", "echo", "fast")
    assert fast.stdout.strip() == "fast"


def test_stop_keeps_domain_and_disk(state: dict[str, object]) -> None:
    vm_id = str(state["id"])
    pb_ok("stop", vm_id)
    assert env.domstate(str(state["domain"])) == "shut off"
    assert Path(str(state["disk"])).exists()
    assert listing()[str(state["domain"])]["running"] is False
    assert not ssh_masters(vm_id)
    stopped = pb("ssh", vm_id, "--", "true")
    assert stopped.returncode == 1
    assert "not running" in stopped.stderr


def test_rm_removes_domain_and_disk(state: dict[str, object]) -> None:
    pb_ok("rm", str(state["id"]))
    assert str(state["domain"]) not in env.domain_names()
    assert not Path(str(state["disk"])).exists()
    assert state["base"] not in pool_volumes()  # no other VM used it: freed
    assert str(state["domain"]) not in listing()


# ------------------------------------------------------------------ scenario 2 (boot 2)


def test_run_recreates_and_an_open_session_blocks_rm(state: dict[str, object]) -> None:
    vm_id = str(state["id"])
    session = Session("run", "--memory", MEMORY, "--timeout", TIMEOUT, DEMO_IMAGE)
    state["sessions"].append(session)  # type: ignore[attr-defined]
    session.send("echo session-open\n")
    session.wait_for("session-open", timeout=1500)
    assert env.domstate(str(state["domain"])) == "running"
    refused = pb("rm", "-f", vm_id)
    assert refused.returncode == 1
    assert "SSH session" in refused.stderr
    assert pb("stop", vm_id).returncode == 1
    assert listing()[str(state["domain"])]["in_use"] is True
    state["session"] = session


# ------------------------------------------------------------------ scenario 3 (boots 3-5)


def test_three_vms_in_three_states(state: dict[str, object], tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello").write_text("hello from the host\n")
    cidata = tmp_path / "ci"
    cidata.mkdir()
    user_data = "#cloud-config\nwrite_files:\n- path: /etc/pb-cloudinit\n  content: ok\n"
    (cidata / "user-data").write_text(user_data)
    forward = env.free_port()
    idle, killed = f"{PREFIX}-idle", f"{PREFIX}-killed"
    runs = [
        subprocess.Popen(
            [
                bcvk_bin(), "pb", "run", "-B", "--name", idle, "--memory", MEMORY, "--cpus", "1",
                "--timeout", TIMEOUT, "--cloudinit", str(cidata),
                "-v", f"{share}:/mnt/share", "-p", f"{forward}:22", DEMO_IMAGE,
            ],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ),
        subprocess.Popen(
            [
                bcvk_bin(), "pb", "run", "-B", "--name", killed, "--memory", MEMORY, "--cpus", "1",
                "--timeout", TIMEOUT, DEMO_IMAGE,
            ],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ),
    ]  # fmt: skip
    for proc in runs:
        out, err = proc.communicate(timeout=1800)
        assert proc.returncode == 0, err
        assert len(out.strip()) == 12  # -B prints the ID

    # --volume: the host directory, read-write, at the guest path
    assert pb_ok("ssh", idle, "--", "cat", "/mnt/share/hello").stdout == "hello from the host\n"
    pb_ok("ssh", idle, "--", "sh", "-c", "echo from-guest > /mnt/share/back")
    assert (share / "back").read_text() == "from-guest\n"
    # --port: the host port reaches the guest's port (sshd answers with its banner)
    with socket.create_connection(("127.0.0.1", forward), timeout=30) as conn:
        assert conn.recv(64).startswith(b"SSH-2.0-")
    # --cloudinit: the guest sees a NoCloud seed labelled cidata with the user-data
    # (the demo image has no cloud-init to apply it; see the README)
    seed = pb_ok(
        "ssh", idle, "--", "sh", "-c",
        "mkdir -p /run/seed && mount -o ro \"$(blkid -L cidata)\" /run/seed"
        " && cat /run/seed/user-data && umount /run/seed",
    )  # fmt: skip
    assert seed.stdout == user_data

    # killed behind bcvk's back: list shows it stopped (that a stopped VM's
    # disk survives a start is test_libvirt's stop/start, the same code)
    env.virsh("destroy", killed)
    assert listing()[killed]["running"] is False
    assert pb("ssh", killed, "--", "true").returncode != 0

    rows = listing()
    own = str(state["domain"])
    assert {own, idle, killed} <= set(rows)
    assert (rows[own]["running"], rows[own]["in_use"]) == (True, True)
    assert (rows[idle]["running"], rows[idle]["in_use"]) == (True, False)
    assert (rows[killed]["running"], rows[killed]["in_use"]) == (False, False)
    state["idle"], state["killed"] = rows[idle], rows[killed]


def test_rm_all_skips_the_vm_in_use_and_rm_works_after_the_session(
    state: dict[str, object],
) -> None:
    removed = pb("rm", "-f", "--all")
    assert removed.returncode == 0, removed.stderr
    assert "SSH session is open" in removed.stderr
    rows = listing()
    own = str(state["domain"])
    assert own in rows
    assert not any(name.startswith(PREFIX) for name in rows)
    for row in (state["idle"], state["killed"]):
        assert isinstance(row, dict)
        assert not Path(str(row["disk_path"])).exists()
        if row["cloudinit_iso"]:
            assert not Path(str(row["cloudinit_iso"])).exists()
    session = state["session"]
    assert isinstance(session, Session)
    assert session.close() == 0
    assert env.domstate(own) == "running"  # no CMD, no --rm: it keeps running
    assert listing()[own]["in_use"] is False
    pb_ok("rm", "-f", str(state["id"])[:6])
    assert own not in env.domain_names()
    assert not ssh_masters(str(state["id"]))


# ------------------------------------------------------------------ scenario 4 (boot 6)


def test_run_rm_with_command_exits_with_its_status_and_leaves_no_vm(
    state: dict[str, object],
) -> None:
    result = pb(
        "run", "--rm", "--memory", MEMORY, "--timeout", TIMEOUT, DEMO_IMAGE,
        "sh", "-c", "cat /etc/os-release; exit 7",
    )  # fmt: skip
    assert result.returncode == 7, result.stderr
    assert "ID=debian" in result.stdout
    assert str(state["domain"]) not in env.domain_names()
    assert f"{state['domain']}.qcow2" not in pool_volumes()
    assert str(state["domain"]) not in listing()
    assert not ssh_masters(str(state["id"]))
    idle = state["idle"]
    assert isinstance(idle, dict)
    base = idle["base_disk"]  # the same image and disk inputs: the same base disk
    assert os.path.exists(f"/var/lib/libvirt/images/{base}")  # the disk stays cached
