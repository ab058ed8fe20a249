"""`bcvk libvirt` end to end: real libvirtd, real QEMU (TCG here), real SSH.

One VM carries most checks (upstream's `comprehensive_workflow` idea) so the
suite boots few guests: run (boot 1, halted in its kernel and restarted) →
ssh, binds, forwards, list → a second VM defined as a backing-file clone (no
boot) → stop → start (boot 2) → rm; then a transient VM (boot 3) and the
failure paths, none of which boots.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bcvk.libvirt.metadata import BOOTC_NS
from tests import schemas
from tests.conftest import DEMO_IMAGE, FIXTURES, bcvk, bcvk_popen, image_exists
from tests.integration import libvirt_env as env
from tests.integration.guest_logs import halt_in_the_kernel, journal, seqnum

PREFIX = f"bcvk-it-{uuid.uuid4().hex[:6]}"
BOOT_TIMEOUT = "900"  # seconds; TCG on a shared 2-core host


def lv(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess[str]:
    return bcvk("libvirt", "-c", env.URI, *args, timeout=timeout)


def lv_ok(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess[str]:
    result = lv(*args, timeout=timeout)
    assert result.returncode == 0, f"bcvk libvirt {' '.join(args)}:\n{result.stderr}"
    return result


def guest(name: str, command: str) -> subprocess.CompletedProcess[str]:
    return lv("ssh", name, "--", command, timeout=120)


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[None]:
    env.ensure_daemons()
    if not image_exists(DEMO_IMAGE):
        pytest.skip(f"{DEMO_IMAGE} not built (run `make images`)")
    yield
    env.cleanup(PREFIX)
    left = {n for n in env.domain_names() if n.startswith(PREFIX)}
    assert not left, f"domains left behind: {left}"


@dataclass
class Vm:
    name: str
    rw: Path
    ro: Path
    forward: int
    info: dict[str, object]
    logs: Path  # its --log-dir
    run_stderr: str  # what `libvirt run` said


@pytest.fixture(scope="module")
def vm(libvirtd: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vm]:
    shared = tmp_path_factory.mktemp("libvirt-shares")
    rw = shared / "rw"
    ro = shared / "ro"
    rw.mkdir()
    ro.mkdir()
    (rw / "hello").write_text("hello from the host\n")
    (ro / "data").write_text("read-only data\n")
    forward = env.free_port()
    logs = shared / "logs"  # made by bcvk
    name = f"{PREFIX}-main"
    proc = bcvk_popen(
        "libvirt", "-c", env.URI,
        "run", "--name", name, "--label", env.LABEL, "--memory", "1536M",
        "--bind", f"{rw}:/mnt/rw", "--bind-ro", f"{ro}:/mnt/ro",
        "--log-dir", f"journal={logs}", "--firmware-log", "--bind-storage-ro",
        "-p", f"{forward}:22", "--ssh-wait", "--timeout", BOOT_TIMEOUT, DEMO_IMAGE,
        env={"BCVK_BOOT_STALL_TIMEOUT": "20"},
    )  # fmt: skip
    try:
        # Its first boot is halted in the kernel (vCPUs paused, as QEMU's TCG
        # hang leaves them): bcvk restarts the domain once (test_stalled_first_boot…).
        console = Path(f"/var/log/libvirt/qemu/{name}-console.log")
        halt_in_the_kernel(console, lambda: env.virsh("suspend", name), proc, timeout=600)
        _, err = proc.communicate(timeout=1500)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    info = json.loads(lv_ok("inspect", name, "--format", "json").stdout)
    yield Vm(name, rw, ro, forward, info, logs, err)
    lv("rm", "-f", name)


def test_stalled_first_boot_is_restarted_once(vm: Vm) -> None:
    """The fixture's VM was paused in its kernel's boot: after the console's
    20 s of silence bcvk said so and started the domain again, which booted."""
    restarted = [line for line in vm.run_stderr.splitlines() if "booting it again" in line]
    assert len(restarted) == 1, vm.run_stderr
    assert restarted[0].startswith("warning: the guest's kernel printed nothing for 20s")
    assert env.domstate(vm.name) == "running"
    console = Path(str(vm.info["console_log"])).read_text(errors="replace")
    assert console.count("] Linux version") == 2  # the halted boot and the one that ran
    assert guest(vm.name, "true").returncode == 0


def test_run_gives_a_running_domain_with_a_clone_disk_and_ssh(vm: Vm) -> None:
    assert env.domstate(vm.name) == "running"
    md = vm.info["metadata"]
    assert isinstance(md, dict)
    disk = Path(str(vm.info["disk_path"]))
    assert disk.parent == env.POOL_DIR
    assert disk.name in env.volumes()
    base = env.POOL_DIR / str(md["base_disk"])
    assert env.backing_file(disk) == str(base)
    assert base.name.startswith("bootc-base-")
    os_release = guest(vm.name, "cat /etc/os-release")
    assert os_release.returncode == 0, os_release.stderr
    assert "ID=debian" in os_release.stdout
    # --disk-size 20G (the default) is what the guest's root filesystem sees.
    df = guest(vm.name, "df -B1 --output=size / | tail -1")
    assert int(df.stdout.strip()) > 18 * 1024**3


def test_metadata_in_libvirt_and_no_private_key(vm: Vm) -> None:
    xml = env.virsh("dumpxml", vm.name).stdout
    assert 'xmlns:bootc="https://github.com/containers/bootc"' in xml
    assert f"<bootc:source-image>{DEMO_IMAGE}</bootc:source-image>" in xml
    key = Path(str(vm.info["ssh_private_key_path"]))
    assert key.read_text() not in xml
    assert "PRIVATE KEY" not in xml
    assert key.stat().st_mode & 0o777 == 0o600
    assert key.parent.stat().st_mode & 0o777 == 0o700
    # the guest is reached with exactly that key and port
    assert key.name == "id_ed25519"


def test_list_json_has_what_test_frameworks_need(vm: Vm) -> None:
    rows = json.loads(lv_ok("list", "--format", "json", "--label", env.LABEL).stdout)
    schemas.check("libvirt-list", rows)
    row = next(r for r in rows if r["name"] == vm.name)
    assert row["state"] == "running"
    assert row["ssh_host"] == "127.0.0.1"
    assert row["ssh_port"] == vm.info["ssh_port"]
    assert row["ssh_user"] == "root"
    assert Path(row["ssh_private_key_path"]).is_file()
    assert row["image"] == DEMO_IMAGE
    assert row["labels"] == [env.LABEL]
    assert row["has_ssh_key"] is True
    assert "ssh_private_key" not in row
    table = lv_ok("list").stdout
    assert vm.name in table
    # upstream's spellings: -c after the verb, one DOMAIN, the key inlined on request
    (one,) = json.loads(
        bcvk("libvirt", "list", vm.name, "-c", env.URI, "--format", "json",
             "--include-private-key").stdout
    )  # fmt: skip
    assert one["ssh_private_key"] == Path(row["ssh_private_key_path"]).read_text()


def test_journal_and_console_reach_the_host(vm: Vm) -> None:
    """Upstream's run_journal_output and run_console_log: the journal over
    virtio-serial (from the base disk's second initrd), the serial console
    logged by libvirt."""
    assert any("MESSAGE_ID" in entry for entry in journal(vm.logs / "journal.json"))
    # the initrd's own stream starts at its first entry
    assert seqnum(journal(vm.logs / "journal-initrd.json")[0]) == 1
    xml = ET.fromstring(env.virsh("dumpxml", vm.name).stdout)
    channels = {c.get("name"): c for c in xml.iterfind("devices/channel/target")}
    assert set(channels) == {"org.bcvk.journal", "org.bcvk.journal.initrd"}
    console = Path(str(vm.info["console_log"]))
    log = xml.find("devices/serial/log")
    assert log is not None
    assert log.get("file") == str(console)
    assert log.get("append") == "on"
    assert "systemd" in console.read_text(errors="replace")


# perl, not python3, is in the image: one byte at a time to OVMF's debug port
DEBUGCON_PROBE = (
    "open(my $p, '+<', '/dev/port') or die \"$!\\n\"; "
    'for my $c (split //, "BCVK-DEBUGCON-PROBE\\n") { sysseek($p, 0x402, 0); syswrite($p, $c) }'
)


def test_firmware_log_is_the_debug_port(vm: Vm) -> None:
    """--firmware-log: isa-debugcon at 0x402, logged to --log-dir's firmware.txt.
    Debian's OVMF is a release build that writes nothing there, so the guest does."""
    xml = ET.fromstring(env.virsh("dumpxml", vm.name).stdout)
    debug = [s for s in xml.iterfind("devices/serial") if s.find("target[@type='isa-debug']")]
    assert len(debug) == 1
    address = debug[0].find("address")
    assert address is not None
    assert address.get("iobase") == "0x402"
    assert guest(vm.name, f"perl -e {shlex.quote(DEBUGCON_PROBE)}").returncode == 0
    assert "BCVK-DEBUGCON-PROBE" in wait_for_text(vm.logs / "firmware.txt", "BCVK-DEBUGCON-PROBE")


def wait_for_text(path: Path, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    content = ""
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            break
        time.sleep(0.5)
    return content


def test_ssh_propagates_exit_status(vm: Vm) -> None:
    assert guest(vm.name, "exit 42").returncode == 42
    result = lv("ssh", vm.name, "--", "echo", "two words")
    assert result.stdout == "two words\n"
    # upstream's ssh flags reach ssh: the user, a -o option, the log level
    whoami = lv("ssh", "--user", "root", "--log-level", "quiet",
                "--extra-options", "ServerAliveInterval=7", vm.name, "--", "id -un")  # fmt: skip
    assert whoami.stdout == "root\n", whoami.stderr
    nobody = lv("ssh", "--user", "nobody", "--timeout", "5", vm.name, "--", "true")
    assert nobody.returncode == 255  # the key is root's: ssh itself refuses


def test_scp_both_ways(vm: Vm, tmp_path: Path) -> None:
    (tmp_path / "in").write_text("to the guest\n")
    assert lv("scp", str(tmp_path / "in"), f"{vm.name}:/var/tmp/in").returncode == 0
    assert guest(vm.name, "cat /var/tmp/in").stdout == "to the guest\n"
    got = lv("scp", f"{vm.name}:/etc/hostname", str(tmp_path / "out"))
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "out").read_text() == guest(vm.name, "cat /etc/hostname").stdout
    assert lv("scp", f"{vm.name}:/nonexistent", str(tmp_path)).returncode == 1


def test_bind_mounts_are_visible_writable_and_read_only(vm: Vm) -> None:
    assert guest(vm.name, "cat /mnt/rw/hello").stdout == "hello from the host\n"
    assert guest(vm.name, "echo from-guest > /mnt/rw/written").returncode == 0
    assert (vm.rw / "written").read_text() == "from-guest\n"
    assert guest(vm.name, "cat /mnt/ro/data").stdout == "read-only data\n"
    assert guest(vm.name, "touch /mnt/ro/nope").returncode != 0
    status = json.loads(lv_ok("status", "--format", "json").stdout)
    enforcement = vm.info["metadata"]["readonly_enforcement"]  # type: ignore[index]
    assert enforcement == status["readonly_bind_enforcement"]
    if enforcement == "host":
        # Even root remounting it read-write in the guest cannot write: virtiofsd refuses.
        remount = guest(vm.name, "mount -o remount,rw /mnt/ro && touch /mnt/ro/nope2")
        assert remount.returncode != 0
    assert not (vm.ro / "nope").exists()
    assert not (vm.ro / "nope2").exists()


def test_bind_storage_ro_shares_the_hosts_store_read_only(vm: Vm) -> None:
    """Upstream's run_bind_storage_ro, libvirt side: the `hoststorage` virtiofs
    share, readable and not writable in the guest, and podman's storage.conf
    names it (upstream needs libvirt 11's <readonly/>; bcvk enforces it in the
    host's virtiofsd on this libvirt 9)."""
    xml = ET.fromstring(env.virsh("dumpxml", vm.name).stdout)
    tags = {t.get("dir") for t in xml.iterfind("devices/filesystem/target")}
    assert "hoststorage" in tags
    listing = guest(vm.name, "ls /run/host-container-storage/overlay")
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.strip()
    assert guest(vm.name, "touch /run/host-container-storage/bcvk-probe").returncode != 0
    conf = guest(vm.name, "cat /etc/containers/storage.conf /etc/environment").stdout
    assert 'additionalimagestores = ["/run/host-container-storage"]' in conf
    assert "STORAGE_OPTS=additionalimagestore=/run/host-container-storage" in conf


def test_port_forward_carries_real_traffic_on_loopback_only(vm: Vm) -> None:
    key = str(vm.info["ssh_private_key_path"])
    ssh = subprocess.run(
        [
            "ssh", "-F", "none", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=30", "-i", key, "-p", str(vm.forward),
            "root@127.0.0.1", "cat /etc/hostname",
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert ssh.returncode == 0, ssh.stderr
    assert ssh.stdout.strip()
    listeners = subprocess.run(
        ["ss", "-Hltn", f"sport = :{vm.forward}"], capture_output=True, text=True, check=True
    ).stdout
    assert f"127.0.0.1:{vm.forward}" in listeners
    assert f"0.0.0.0:{vm.forward}" not in listeners


def test_second_vm_of_the_image_is_a_backing_file_clone(vm: Vm) -> None:
    md = vm.info["metadata"]
    assert isinstance(md, dict)
    base = env.POOL_DIR / str(md["base_disk"])
    before = base.stat().st_mtime_ns
    name = f"{PREFIX}-clone"
    created = lv_ok("create", "--name", name, "--label", env.LABEL, DEMO_IMAGE)
    assert "Reusing" in created.stderr
    assert env.domstate(name) == "shut off"
    clone = env.POOL_DIR / f"{name}.qcow2"
    assert env.backing_file(clone) == str(base)
    assert base.stat().st_mtime_ns == before  # reused, not rebuilt
    assert clone.stat().st_blocks * 512 < 10 * 1024**2  # an overlay, not a copy
    rows = json.loads(lv_ok("base-disks", "list", "--format", "json").stdout)
    row = next(r for r in rows if r["name"] == base.name)
    assert row["references"] >= 2
    assert f"{name}.qcow2" in row["referenced_by"]
    pruned = lv_ok("base-disks", "prune", "--dry-run").stdout
    assert base.name not in pruned
    # name taken without --replace
    again = lv("create", "--name", name, DEMO_IMAGE)
    assert again.returncode != 0
    assert "already exists" in again.stderr
    assert "--replace" in again.stderr
    refused = lv("rm", name)  # off a terminal, only -f removes anything
    assert refused.returncode == 2
    assert "pass -f when not on a terminal" in refused.stderr
    lv_ok("rm", "-f", name)
    assert name not in env.domain_names()
    assert not clone.exists()


def test_to_base_disk_and_list_volumes_see_the_vms_base_disk(vm: Vm) -> None:
    md = vm.info["metadata"]
    assert isinstance(md, dict)
    base = env.POOL_DIR / str(md["base_disk"])
    cached = lv_ok("to-base-disk", DEMO_IMAGE)
    assert cached.stdout == f"Using cached base disk: {base}\n"  # upstream's words
    listed = schemas.check(
        "libvirt-list-volumes", json.loads(lv_ok("list-volumes", "--json").stdout)
    )
    rows = {r["name"]: r for r in listed}
    assert rows[base.name]["kind"] == "base"
    assert vm.name in rows[base.name]["vms"]
    disk = Path(str(vm.info["disk_path"]))
    assert rows[disk.name]["vms"] == [vm.name]
    assert rows[disk.name]["backing_file"] == str(base)
    table = lv_ok("list-volumes", "--detailed", "--source-image", DEMO_IMAGE).stdout
    assert table.split("\n")[0].split() == [
        "NAME", "KIND", "SIZE", "VIRTUAL", "VMS", "IMAGE", "FORMAT", "BACKING", "PATH",
    ]  # fmt: skip


def test_stop_then_start_keeps_disk_and_mounts(vm: Vm) -> None:
    disk = Path(str(vm.info["disk_path"]))
    lv_ok("stop", vm.name, "--timeout", "180")
    assert env.domstate(vm.name) == "shut off"
    assert disk.exists()
    down = lv("ssh", vm.name, "--", "true")
    assert down.returncode != 0
    assert "not running" in down.stderr
    lv_ok("start", vm.name, "--ssh-wait", "--timeout", BOOT_TIMEOUT)
    assert env.domstate(vm.name) == "running"
    assert guest(vm.name, "cat /mnt/rw/hello").stdout == "hello from the host\n"
    assert guest(vm.name, "ls /run/host-container-storage/overlay").returncode == 0
    # the journal file is appended to: both boots are in it
    boots = {e.get("_BOOT_ID") for e in journal(vm.logs / "journal.json")}
    assert len(boots - {None}) == 2
    assert guest(vm.name, "touch /mnt/ro/nope").returncode != 0


def test_rm_removes_domain_disk_and_key(vm: Vm) -> None:
    disk = Path(str(vm.info["disk_path"]))
    key = Path(str(vm.info["ssh_private_key_path"]))
    refused = lv("rm", vm.name)
    assert refused.returncode != 0
    assert "is running" in refused.stderr
    console = Path(str(vm.info["console_log"]))
    assert console.exists()
    lv_ok("rm", "-f", vm.name)
    assert vm.name not in env.domain_names()
    assert not disk.exists()
    assert not key.parent.exists()
    assert not console.exists()  # its default console log is bcvk's
    assert (vm.rw / "hello").exists()  # shared host directories are untouched
    # --log-dir is the user's: every file stays
    assert sorted(p.name for p in vm.logs.iterdir()) == [
        "firmware.txt",
        "journal-initrd.json",
        "journal.json",
    ]
    gone = lv("inspect", vm.name)
    assert gone.returncode != 0
    assert "no domain named" in gone.stderr


def test_transient_vm_vanishes_when_stopped(libvirtd: None, tmp_path: Path) -> None:
    name = f"{PREFIX}-transient"
    before = env.volumes()
    console = tmp_path / "console.log"
    lv_ok("run", "--transient", "--name", name, "--memory", "1536M", "--disable-tpm",
          "--console-log", str(console), "--ssh-wait", "--timeout", BOOT_TIMEOUT,
          DEMO_IMAGE)  # fmt: skip
    dominfo = env.virsh("dominfo", name).stdout
    assert any(ln.split() == ["Persistent:", "no"] for ln in dominfo.splitlines()), dominfo
    assert guest(name, "true").returncode == 0
    assert env.volumes() == before  # no per-VM disk: a QEMU-side overlay
    # upstream's run_console_log: the kernel and systemd on the serial console
    assert "systemd" in console.read_text(errors="replace")
    first = json.loads(lv_ok("inspect", name, "--format", "json").stdout)
    # upstream's run_transient_replace: --replace re-creates it, still transient
    lv_ok("run", "--transient", "--replace", "--name", name, "--memory", "1536M",
          "--disable-tpm", DEMO_IMAGE)  # fmt: skip
    dominfo = env.virsh("dominfo", name).stdout
    assert any(ln.split() == ["Persistent:", "no"] for ln in dominfo.splitlines()), dominfo
    assert env.domstate(name) == "running"
    details = json.loads(lv_ok("inspect", name, "--format", "json").stdout)
    assert details["uuid"] != first["uuid"]
    assert not Path(first["ssh_private_key_path"]).parent.exists()  # the first one's key
    assert env.volumes() == before
    key = Path(details["ssh_private_key_path"])
    # libvirt made a variable store for it, and does not delete it: bcvk does
    nvram = Path("/var/lib/libvirt/qemu/nvram") / f"{name}_VARS.fd"
    assert nvram.exists()
    lv_ok("stop", name, "--force")
    assert not nvram.exists()
    assert name not in env.domain_names()
    assert not key.parent.exists()
    assert lv("list", "--all", "--format", "json").stdout.count(name) == 0


# ------------------------------------------------------------------ failure paths


def test_failed_run_leaves_nothing_behind(libvirtd: None, tmp_path: Path) -> None:
    name = f"{PREFIX}-broken"
    keys = Path.home() / ".local" / "share" / "bcvk" / "libvirt"
    keys_before = set(keys.iterdir()) if keys.exists() else set()
    result = lv(
        "run", "--name", name, "--console-log", str(tmp_path / "missing" / "dir" / "c.log"),
        DEMO_IMAGE,
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") or "\nerror: " in result.stderr
    assert name not in env.domain_names()
    assert f"{name}.qcow2" not in env.volumes()
    keys_after = set(keys.iterdir()) if keys.exists() else set()
    assert keys_after == keys_before


def test_not_bootc_image_is_refused(libvirtd: None) -> None:
    if not image_exists(FIXTURES["unlabelled"]):
        pytest.skip("fixture images not built (run `make images`)")
    result = lv("run", "--name", f"{PREFIX}-nb", FIXTURES["unlabelled"])
    assert result.returncode == 1
    assert "is not a bootc image" in result.stderr
    assert "hint: " in result.stderr
    assert f"{PREFIX}-nb" not in env.domain_names()


def test_port_in_use_is_refused(libvirtd: None) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = lv("create", "--name", f"{PREFIX}-port", "-p", f"{port}:80", DEMO_IMAGE)
    assert result.returncode == 1
    assert f"host port {port} is already in use" in result.stderr
    assert f"{PREFIX}-port" not in env.domain_names()


def test_unknown_domains(libvirtd: None) -> None:
    for args in (["ssh", "nope-x", "--", "true"], ["rm", "-f", "nope-x"], ["start", "nope-x"]):
        result = lv(*args)
        assert result.returncode == 1
        assert "no domain named 'nope-x'" in result.stderr


def test_foreign_domains_are_never_touched(libvirtd: None, tmp_path: Path) -> None:
    name = f"{PREFIX}-foreign"
    xml = tmp_path / "foreign.xml"
    xml.write_text(
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
        "<os><type arch='x86_64' machine='q35'>hvm</type></os></domain>"
    )
    env.virsh("define", str(xml))
    try:
        for args in (["rm", "-f", name], ["stop", name], ["ssh", name, "--", "true"]):
            result = lv(*args)
            assert result.returncode == 1
            assert "not created by bcvk" in result.stderr
        lv_ok("rm-all", "-f", "--label", "none-such")
        assert name in env.domain_names()
        assert name not in lv_ok("list", "--all").stdout
    finally:
        env.virsh("undefine", name, check=False)


def test_domain_deleted_behind_our_back(libvirtd: None) -> None:
    name = f"{PREFIX}-vanish"
    lv_ok("create", "--name", name, DEMO_IMAGE)
    env.virsh("undefine", name, "--nvram")
    listed = lv_ok("list", "--all", "--format", "json")
    assert name not in listed.stdout
    result = lv("rm", "-f", name)
    assert result.returncode == 1
    assert "no domain named" in result.stderr
    env.virsh("vol-delete", "--pool", "default", f"{name}.qcow2", check=False)


def test_base_disk_deleted_behind_our_back_is_rebuilt(libvirtd: None) -> None:
    # An odd disk size gives this test a base disk of its own: other VMs on
    # this host (other tests, other engineers) must not lose theirs.
    size = "7G"
    name = f"{PREFIX}-rebuilt"
    lv_ok("create", "--name", name, "--disk-size", size, DEMO_IMAGE)
    info = json.loads(lv_ok("inspect", name, "--format", "json").stdout)
    base = env.POOL_DIR / info["metadata"]["base_disk"]
    lv_ok("rm", "-f", name)
    rows = json.loads(lv_ok("base-disks", "list", "--format", "json").stdout)
    assert next(r for r in rows if r["name"] == base.name)["references"] == 0
    os.unlink(base)  # an admin deletes it behind libvirt's back
    name2 = f"{PREFIX}-rebuilt2"
    lv_ok("create", "--name", name2, "--disk-size", size, DEMO_IMAGE)
    assert base.exists()
    assert env.backing_file(env.POOL_DIR / f"{name2}.qcow2") == str(base)
    lv_ok("rm", "-f", name2)
    env.virsh("vol-delete", "--pool", "default", base.name)


# ------------------------------------------------------------------ what rm may delete


def _inactive_xml(name: str) -> ET.Element:
    return ET.fromstring(env.virsh("dumpxml", "--inactive", name).stdout)


def _set_bootc(root: ET.Element, tag: str, value: str) -> None:
    container = root.find(f"metadata/{{{BOOTC_NS}}}container")
    assert container is not None
    element = container.find(f"{{{BOOTC_NS}}}{tag}")
    if element is None:
        element = ET.SubElement(container, f"{{{BOOTC_NS}}}{tag}")
    element.text = value


def _define(root: ET.Element, tmp_path: Path) -> None:
    path = tmp_path / f"{root.findtext('name')}.xml"
    path.write_text(ET.tostring(root, encoding="unicode"))
    env.virsh("define", str(path))


def test_rm_of_a_clone_leaves_the_originals_disk_and_key(libvirtd: None, tmp_path: Path) -> None:
    """virt-clone keeps <metadata>: rm -f of the clone once deleted the original's disk and key."""
    original, clone = f"{PREFIX}-orig", f"{PREFIX}-copy"
    lv_ok("create", "--name", original, DEMO_IMAGE)
    info = json.loads(lv_ok("inspect", original, "--format", "json").stdout)
    disk, key = Path(info["disk_path"]), Path(info["ssh_private_key_path"])
    # A clone the way virt-clone makes one: a copy of the disk, the XML with a
    # new name and UUID (and NVRAM), the metadata untouched.
    env.virsh("vol-clone", "--pool", "default", disk.name, f"{clone}.qcow2")
    root = _inactive_xml(original)
    root.find("name").text = clone  # type: ignore[union-attr]
    root.remove(root.find("uuid"))  # type: ignore[arg-type]
    for source in root.iter("source"):
        if source.get("file") == str(disk):
            source.set("file", str(env.POOL_DIR / f"{clone}.qcow2"))
    nvram = root.find("os/nvram")
    if nvram is not None and nvram.text:
        nvram.text = nvram.text.replace(original, clone)
    _define(root, tmp_path)
    try:
        refused = lv("ssh", clone, "--", "true")
        assert refused.returncode == 1
        assert "it is a copy" in refused.stderr
        lv_ok("rm", "-f", clone)
        assert clone not in env.domain_names()
        assert f"{clone}.qcow2" not in env.volumes()  # the clone's own disk
        assert disk.exists()  # the original's disk
        assert key.exists()  # and key
        assert env.backing_file(disk) is not None
        assert json.loads(lv_ok("inspect", original, "--format", "json").stdout)["name"] == original
    finally:
        env.virsh("undefine", clone, "--nvram", check=False)
        env.virsh("vol-delete", "--pool", "default", f"{clone}.qcow2", check=False)
        lv("rm", "-f", original)
    assert not disk.exists()
    assert not key.parent.exists()


def test_rm_never_follows_metadata_out_of_bcvks_own_files(libvirtd: None, tmp_path: Path) -> None:
    """Metadata naming a key, a log and a volume that are not the VM's own: all survive rm -f."""
    name = f"{PREFIX}-lies"
    lv_ok("create", "--name", name, DEMO_IMAGE)
    info = json.loads(lv_ok("inspect", name, "--format", "json").stdout)
    own_disk, own_key = Path(info["disk_path"]), Path(info["ssh_private_key_path"])
    victims = tmp_path / "victims"
    victims.mkdir()
    (victims / "id_ed25519").write_text("not bcvk's key\n")
    (victims / "console.log").write_text("someone's log\n")
    victim_volume = f"{PREFIX}-victim.qcow2"
    env.virsh("vol-create-as", "default", victim_volume, "16M", "--format", "qcow2")
    root = _inactive_xml(name)
    _set_bootc(root, "ssh-private-key-path", str(victims / "id_ed25519"))
    _set_bootc(root, "console-log", str(victims / "console.log"))
    _set_bootc(root, "disk-volume", victim_volume)
    _set_bootc(root, "base-disk", victim_volume)
    _define(root, tmp_path)  # the same name and UUID: not a copy, just lying metadata
    try:
        lv_ok("rm", "-f", name)
        assert name not in env.domain_names()
        assert not own_disk.exists()  # what is its own goes
        assert not own_key.parent.exists()
        assert (victims / "id_ed25519").read_text() == "not bcvk's key\n"
        assert (victims / "console.log").read_text() == "someone's log\n"
        assert victim_volume in env.volumes()
    finally:
        env.virsh("vol-delete", "--pool", "default", victim_volume, check=False)
        lv("rm", "-f", name)


def test_concurrent_creates_on_a_cold_cache_share_one_unchanged_base_disk(
    libvirtd: None,
) -> None:
    """Two `create`s of one image with no base disk yet: one builds, the other waits."""
    # A karg of its own makes the base disk cold for this test alone.
    karg = f"bcvk.concurrent={uuid.uuid4().hex[:8]}"
    names = [f"{PREFIX}-con-a", f"{PREFIX}-con-b"]
    volumes_before = env.volumes()
    procs = [
        bcvk_popen("libvirt", "-c", env.URI, "create", "--name", n, "--karg", karg, DEMO_IMAGE)
        for n in names
    ]
    results = []
    for proc in procs:
        _, err = proc.communicate(timeout=1500)
        results.append((proc.returncode, err))
    try:
        for code, err in results:
            assert code == 0, err
        bases = {v for v in env.volumes() - volumes_before if v.startswith("bootc-base-")}
        assert len(bases) == 1, bases
        base = env.POOL_DIR / bases.pop()
        # One of them built it; the other waited for it and reused it.
        assert sum("Reusing" in err for _, err in results) == 1, [e for _, e in results]
        assert any("Waiting for another bcvk" in err for _, err in results)
        before = (base.stat().st_ino, base.stat().st_mtime_ns)
        for n in names:
            assert env.backing_file(env.POOL_DIR / f"{n}.qcow2") == str(base)
        # One boots from it (both are clones of it, checked above), and booting
        # a clone never changes the base disk.
        lv_ok("start", names[0], "--ssh-wait", "--timeout", BOOT_TIMEOUT)
        os_release = guest(names[0], f"grep -q {karg} /proc/cmdline && cat /etc/os-release")
        assert os_release.returncode == 0, os_release.stderr
        assert "ID=debian" in os_release.stdout
        lv_ok("stop", names[0], "--force")
        assert (base.stat().st_ino, base.stat().st_mtime_ns) == before
    finally:
        for n in names:
            lv("rm", "-f", n)
    # Only this test's base disk: others' are caches other tests reuse.
    env.virsh("vol-delete", "--pool", "default", base.name)


def test_nothing_left_behind(libvirtd: None) -> None:
    assert not {n for n in env.domain_names() if n.startswith(PREFIX)}
    assert not {v for v in env.volumes() if v.startswith(PREFIX)}
