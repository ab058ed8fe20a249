"""The same commands as an unprivileged user (rootless podman, `podman unshare`)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from collections.abc import Iterator

import pytest

from tests.conftest import DEMO_IMAGE
from tests.integration.ephemeral_support import (
    SSH_TIMEOUT,
    Session,
    marked_processes,
    mount_counts,
    unique,
)

pytestmark = pytest.mark.usefixtures("no_leaks")


@pytest.fixture
def user_session(rootless_user: str) -> Iterator[Session]:
    s = Session(
        token=secrets.token_hex(6),
        runtime=None,  # type: ignore[arg-type]  # the user's own runtime dir
        user=rootless_user,
        mounts_before=mount_counts(rootless_user),
    )
    yield s
    for name in s.state_dirs():
        s.bcvk("ephemeral", "rm", "-f", name, timeout=120)


def test_run_ssh_as_unprivileged_user(user_session: Session) -> None:
    result = user_session.bcvk(
        "ephemeral", "run-ssh", "--rootfs", "virtiofs", "--ssh-timeout", SSH_TIMEOUT,
        DEMO_IMAGE, "--", "grep -o 'root=[^ ]*' /proc/cmdline; exit 42",
    )  # fmt: skip
    assert result.returncode == 42, result.stderr
    # virtiofsd runs inside `podman unshare`
    assert result.stdout.split() == ["root=virtiofs:rootfs"]
    assert user_session.leftovers() == []


def test_detached_vm_as_unprivileged_user(user_session: Session) -> None:
    name = unique("rootless")
    started = user_session.bcvk(
        "ephemeral", "run", "-d", "--rootfs", "virtiofs", "--name", name, DEMO_IMAGE
    )
    assert started.returncode == 0, started.stderr
    listed = json.loads(user_session.bcvk("ephemeral", "ps", "--format", "json").stdout)
    assert [(e["name"], e["state"], e["rootfs"]) for e in listed] == [(name, "running", "virtiofs")]
    removed = user_session.bcvk("ephemeral", "rm", "-f", name)
    assert removed.returncode == 0, removed.stderr
    assert json.loads(user_session.bcvk("ephemeral", "ps", "--format", "json").stdout) == []
    assert user_session.leftovers() == []


def test_block_transport_and_warm_start_as_unprivileged_user(user_session: Session) -> None:
    """The rootfs image is built inside `podman unshare`; the snapshot is the user's own."""
    first = user_session.bcvk(
        "ephemeral", "run-ssh", "--warm", "refresh", "--ssh-timeout", SSH_TIMEOUT, DEMO_IMAGE,
        "--", "grep -o 'root=LABEL=[^ ]*' /proc/cmdline",
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("root=LABEL=bcvk-")
    assert "saved warm-start snapshot" in first.stderr
    again = user_session.bcvk(
        "ephemeral", "run-ssh", "--ssh-timeout", SSH_TIMEOUT, DEMO_IMAGE, "--",
        "hostname; grep -c . /root/.ssh/authorized_keys; exit 7",
    )  # fmt: skip
    assert again.returncode == 7, again.stderr
    assert "warm start: restoring snapshot" in again.stderr
    hostname, keys = again.stdout.split()
    assert (hostname.startswith("bcvk-"), keys) == (True, "1")
    cached = json.loads(user_session.bcvk("cache", "list", "--format", "json").stdout)
    assert any(e["rootfs"] and e["snapshots"] for e in cached), cached
    assert user_session.leftovers() == []


def test_sigkill_of_rootless_bcvk_leaves_no_orphans(user_session: Session) -> None:
    """QEMU and the virtiofsd inside `podman unshare` die with a SIGKILLed bcvk."""
    name = unique("rootless-kill")
    proc = user_session.popen(
        "ephemeral", "run-ssh", "--rootfs", "virtiofs", "--name", name, DEMO_IMAGE, "--", "true"
    )
    try:
        user_session.wait_for_processes(name, {"qemu", "virtiofsd"})
        record = user_session.wait_for_phase(name, "running")
        os.kill(record["supervisor"]["pid"], signal.SIGKILL)
    finally:
        proc.communicate(timeout=60)
    deadline = time.monotonic() + 20
    while marked_processes(user_session.token) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marked_processes(user_session.token) == []
    listed = user_session.bcvk("ephemeral", "ps", "--format", "json")
    assert (listed.returncode, json.loads(listed.stdout)) == (0, [])
    assert user_session.leftovers() == []
