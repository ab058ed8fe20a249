"""`bcvk pb` core: identity, metadata, locks, SSH sharing paths, seed ISOs — no VM.

The lifecycle part runs against libvirt's hermetic test:///default driver
with podman, the disk build and SSH replaced by fakes.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bcvk import pb
from bcvk.errors import BcvkError, NotFoundError, UsageError
from bcvk.guest import cloudinit, credentials
from bcvk.host import podman
from bcvk.libvirt import domains, lifecycle, provision
from bcvk.libvirt import vms as vmview
from bcvk.libvirt import xml as lx
from bcvk.libvirt.connection import Connection
from bcvk.pb import launcher as pblaunch
from bcvk.pb import model
from bcvk.pb import session as pbsession
from bcvk.values import GIB, MIB
from tests.unit.testdriver import POOL, URI, fake_base_disks, shared_connection

IMAGE = "localhost/bcvk/debian-bootc:12"
IMAGE_ID = "8ae7e19ce1c7" + "ab" * 26


def vm(vm_id: str, name: str | None = None, created: str = "2026-01-01T00:00:00+00:00") -> pb.PbVm:
    md = lx.Metadata(source_image=IMAGE, ssh_port=2300, created=created)
    dom = name or model.DOMAIN_PREFIX + vm_id
    view = vmview.Vm(name=dom, uuid="u", state="running", persistent=True, metadata=md)
    return pb.PbVm(pb.PbInfo(vm_id, name, IMAGE_ID, IMAGE), view)


# ------------------------------------------------------------------ pure


def test_identity_rules() -> None:
    assert model.image_vm_id("sha256:" + IMAGE_ID) == "8ae7e19ce1c7"
    assert model.image_vm_id(IMAGE_ID) == "8ae7e19ce1c7"
    assert model.domain_name("8ae7e19ce1c7", None) == "podman-bootc-8ae7e19ce1c7"
    assert model.domain_name("0123456789ab", "web") == "web"
    fresh = model.new_id({"aaaaaaaaaaaa"})
    assert len(fresh) == 12
    assert int(fresh, 16) >= 0
    with pytest.raises(BcvkError):
        model.image_vm_id("not-hex")


def test_resolve_by_id_name_prefix_and_ambiguity() -> None:
    vms = [vm("abc111111111"), vm("abc222222222", "web"), vm("def333333333")]
    assert model.resolve(vms, "abc111111111").id == "abc111111111"
    assert model.resolve(vms, "web").id == "abc222222222"
    assert model.resolve(vms, "podman-bootc-def333333333").id == "def333333333"
    assert model.resolve(vms, "d").id == "def333333333"
    assert model.resolve(vms, "abc2").id == "abc222222222"
    with pytest.raises(UsageError, match="ambiguous") as info:
        model.resolve(vms, "abc")
    assert "abc111111111" in info.value.message
    assert "abc222222222 (web)" in info.value.message
    with pytest.raises(NotFoundError, match="no podman-bootc VM 'zzz'"):
        model.resolve(vms, "zzz")
    assert model.find(vms, "zzz") is None


def test_latest_is_the_newest() -> None:
    old = vm("aaaaaaaaaaaa", created="2026-01-01T00:00:00+00:00")
    new = vm("bbbbbbbbbbbb", created="2026-02-01T00:00:00+00:00")
    assert model.latest([new, old]).id == "bbbbbbbbbbbb"
    with pytest.raises(NotFoundError):
        model.latest([])


def test_disk_size_follows_podman_bootc() -> None:
    assert model.default_disk_size(400 * MIB, None) == 10 * GIB
    assert model.default_disk_size(6 * GIB, None) == 12 * GIB
    assert model.default_disk_size(400 * MIB, 20 * GIB) == 20 * GIB
    assert model.default_disk_size(400 * MIB, 5 * GIB) == 10 * GIB
    assert model.default_disk_size(6 * GIB + 1, None) % MIB == 0


def test_pb_info_round_trip_and_non_pb_domains() -> None:
    info = pb.PbInfo(
        "0123456789ab", "web", IMAGE_ID, IMAGE, "core", 10 * GIB, "xfs", 5 * GIB, "/p/x.iso"
    )
    assert pb.PbInfo.from_element(info.to_element()) == info
    minimal = pb.PbInfo("0123456789ab", None, IMAGE_ID, IMAGE)
    assert pb.PbInfo.from_element(minimal.to_element()) == minimal
    bad = ET.Element("x", {"id": "short"})
    assert pb.PbInfo.from_element(bad) is None
    plain = lx.build(
        lx.DomainSpec(
            name="plain", memory_mib=1024, vcpus=1, disk_path="/d.qcow2",
            metadata=lx.Metadata(source_image=IMAGE),
        )
    ).to_xml()  # fmt: skip
    assert model.pb_info_from_xml(plain) is None


def test_patch_keeps_the_libvirt_view_and_adds_pb_cdrom_and_user_key() -> None:
    key = "ssh-ed25519 AAAAC3Nza test"
    spec = lx.DomainSpec(
        name="podman-bootc-0123456789ab",
        memory_mib=2048,
        vcpus=2,
        disk_path="/pool/podman-bootc-0123456789ab.qcow2",
        credentials=(
            credentials.smbios_value(
                credentials.TMPFILES_CREDENTIAL, credentials.tmpfiles_authorized_key(key)
            ),
        ),
        metadata=lx.Metadata(source_image=IMAGE, ssh_port=2345),
    )
    original = lx.build(spec).to_xml()
    info = pb.PbInfo("0123456789ab", None, IMAGE_ID, IMAGE, user="core", disk_size=10 * GIB)
    patched = model.patch_domain_xml(
        original,
        info,
        seed_iso="/pool/podman-bootc-0123456789ab-cidata.iso",
        tmpfiles_credential=model.key_credential(key, "core"),
    )
    assert model.pb_info_from_xml(patched) == info
    dom = lx.Domain.from_xml(patched)
    assert dom.metadata is not None
    assert dom.metadata.ssh_port == 2345  # the libvirt layer still reads its metadata
    assert [d.source for d in dom.disks] == ["/pool/podman-bootc-0123456789ab.qcow2"]
    root = ET.fromstring(patched)
    cdrom = root.find("devices/disk[@device='cdrom']")
    assert cdrom is not None
    assert cdrom.find("source").get("file").endswith("-cidata.iso")  # type: ignore[union-attr]
    assert cdrom.find("target").get("bus") == "sata"  # type: ignore[union-attr]
    assert cdrom.find("readonly") is not None
    (oem,) = dom.oem_strings
    payload = oem.split("=", 1)[1]
    import base64

    text = base64.b64decode(payload).decode()
    assert "/root/.ssh/authorized_keys" in text
    assert "/home/core/.ssh/authorized_keys 0600 core core" in text
    # Patching twice replaces the pb element instead of adding a second one.
    again = model.patch_domain_xml(patched, dataclasses.replace(info, user="root"))
    assert ET.fromstring(again).find(".//{*}podman-bootc").get("user") == "root"  # type: ignore[union-attr]
    assert len(ET.fromstring(again).findall(".//{*}podman-bootc")) == 1


def test_control_path_stays_short(tmp_path: Path) -> None:
    short = Path("/run/user/0/bcvk/pb")
    uri = "qemu:///system"
    path = pbsession.control_path("0123456789ab", 2345, "root", uri, short)
    assert path is not None
    assert path.parent == short
    assert path.name.startswith("0123456789ab-2345-root-")
    user = pbsession.control_path("0123456789ab", 2345, "core", uri, short)
    assert user is not None
    assert user.name.startswith("0123456789ab-2345-core-")
    other_uri = pbsession.control_path("0123456789ab", 2345, "root", "qemu:///session", short)
    assert other_uri != path
    # ssh binds "<path>.<16 random chars>" first: that too must fit sun_path (108).
    assert len(os.fsencode(path)) + 17 < 108
    longest = pbsession.control_path(
        "0123456789ab", 65535, "u" * 40, uri, Path("/tmp/bcvk-65534/pb")
    )
    assert longest is not None
    assert len(os.fsencode(longest)) + 17 < 108
    assert pbsession.control_path("0123456789ab", 2345, "root", uri, Path("/" + "x" * 80)) is None


@pytest.mark.parametrize(
    ("env", "uid_root"),
    [({}, True), ({"LIBVIRT_DEFAULT_URI": "test:///default"}, True), ({}, False)],
)
def test_effective_uri_matches_the_connection_default(
    env: dict[str, str], uid_root: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bcvk.libvirt.uri import default_uri

    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(os, "geteuid", lambda: 0 if uid_root else 1000)
    assert model.effective_uri(None) == default_uri()
    assert model.effective_uri("qemu:///x") == "qemu:///x"


def test_shared_connection_is_found_without_libvirt_only_when_unique_and_live(
    tmp_path: Path,
) -> None:
    import socket as sk

    directory = Path(f"/tmp/pbs-{os.getpid()}")
    directory.mkdir(mode=0o700, exist_ok=True)
    uri = "qemu:///system"
    try:
        path = pbsession.control_path("0123456789ab", 2345, "core", uri, directory)
        assert path is not None
        assert (
            pbsession.shared_connection("0123456789ab", None, uri, directory) is None
        )  # no socket
        with sk.socket(sk.AF_UNIX, sk.SOCK_STREAM) as server:
            server.bind(os.fspath(path))
            server.listen()
            found = pbsession.shared_connection("0123456789ab", None, uri, directory)
            assert found == ("0123456789ab", 2345, "core", path)
            by_name = pbsession.shared_connection(
                "podman-bootc-0123456789ab", "core", uri, directory
            )
            assert by_name == found
            assert pbsession.shared_connection("0123456789ab", "root", uri, directory) is None
            assert (
                pbsession.shared_connection("0123456789ab", None, "qemu:///session", directory)
                is None
            )
            assert (
                pbsession.shared_connection("0123", None, uri, directory) is None
            )  # prefixes: libvirt
            assert (
                pbsession.shared_connection("web", None, uri, directory) is None
            )  # names: libvirt
            second = pbsession.control_path("0123456789ab", 2345, "root", uri, directory)
            assert second is not None
            second.touch()
            assert pbsession.shared_connection("0123456789ab", None, uri, directory) is None  # two
            second.unlink()
        # a dead master's socket is not used, and is cleaned up
        assert pbsession.shared_connection("0123456789ab", None, uri, directory) is None
        assert not path.exists()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_validate_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="invalid user"):
        pblaunch.validate(pb.RunOptions(user="Bad User"))
    with pytest.raises(UsageError, match="belong to the images' own VMs"):
        pblaunch.validate(pb.RunOptions(name="podman-bootc-x"))
    with pytest.raises(UsageError, match="no user-data"):
        pblaunch.validate(pb.RunOptions(cloudinit=tmp_path))
    with pytest.raises(NotFoundError, match="no such directory"):
        pblaunch.validate(pb.RunOptions(cloudinit=tmp_path / "missing"))
    with pytest.raises(UsageError, match="--bind"):
        pb.make_run_options(URI, volumes=("nocolon",))


# ------------------------------------------------------------------ locks


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    short = Path(f"/tmp/pbt-{os.getpid()}")
    short.mkdir(mode=0o700, exist_ok=True)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short))
    yield short
    shutil.rmtree(short, ignore_errors=True)


def test_session_lock_blocks_exclusive_and_shows_in_use(runtime: Path) -> None:
    assert not pbsession.in_use("0123456789ab")
    with pbsession.VmLock("0123456789ab") as session:
        session.shared()
        assert pbsession.in_use("0123456789ab")
        with pbsession.VmLock("0123456789ab") as other:
            other.shared(wait=1)  # sessions share
            with pbsession.VmLock("0123456789ab") as remover:
                assert not remover.try_exclusive()
    assert not pbsession.in_use("0123456789ab")
    with pbsession.VmLock("0123456789ab") as remover:
        assert remover.try_exclusive()
        with pbsession.VmLock("0123456789ab") as late, pytest.raises(BcvkError, match="timed out"):
            late.shared(wait=0.3)


def test_a_dead_sessions_lock_does_not_block(runtime: Path) -> None:
    script = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_SH)\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    path = pbsession.lock_path("0123456789ab")
    child = subprocess.Popen(
        ["python3", "-c", script, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "locked"
    with pbsession.VmLock("0123456789ab") as remover:
        assert not remover.try_exclusive()
    assert pbsession.in_use("0123456789ab")
    child.kill()
    child.wait()
    with pbsession.VmLock("0123456789ab") as remover:
        assert remover.try_exclusive()


def test_proc_locks_parsing() -> None:
    text = (
        "1: FLOCK  ADVISORY  READ  1234 00:1a:5678 0 EOF\n"
        "1: -> FLOCK  ADVISORY  WRITE 99 00:1a:5678 0 EOF\n"
        "2: POSIX  ADVISORY  WRITE 4321 fd:01:42 0 EOF\n"
        "3: OFDLCK ADVISORY  READ  -1 08:02:7 0 EOF\n"
    )
    assert pbsession.locked_inodes(text) == {(0, 0x1A, 5678)}


# ------------------------------------------------------------------ cloud-init seed


def test_seed_iso_is_labelled_cidata_with_the_users_files(tmp_path: Path) -> None:
    source = tmp_path / "ci"
    source.mkdir()
    (source / "user-data").write_text("#cloud-config\nruncmd: [touch /x]\n")
    (source / "unrelated.txt").write_text("not for cloud-init")
    iso = cloudinit.build_seed(source, tmp_path / "out" / "seed.iso", instance_id="i", hostname="h")
    info = subprocess.run(
        ["xorriso", "-indev", str(iso), "-pvd_info"], capture_output=True, text=True, check=True
    )
    assert "Volume Id    : cidata" in info.stdout
    listing = subprocess.run(
        ["xorriso", "-indev", str(iso), "-find", "/", "-type", "f"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert sorted(line.strip("'") for line in listing.split()) == ["/meta-data", "/user-data"]
    extracted = tmp_path / "x"
    subprocess.run(
        ["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", "/", str(extracted)],
        capture_output=True,
        check=True,
    )
    assert (extracted / "user-data").read_text() == (source / "user-data").read_text()
    assert "instance-id: i" in (extracted / "meta-data").read_text()
    assert not list((tmp_path / "out").glob("*.partial"))


def test_xorriso_argv() -> None:
    argv = cloudinit.xorriso_argv("/usr/bin/xorriso", Path("/src"), Path("/o.iso"))
    assert argv[:3] == ["/usr/bin/xorriso", "-as", "mkisofs"]
    assert argv[argv.index("-volid") + 1] == "cidata"
    assert {"-joliet", "-rock"} <= set(argv)
    assert argv[-1] == "/src"


# ------------------------------------------------------------------ lifecycle on test:///


@pytest.fixture
def conn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runtime: Path) -> Iterator[Connection]:
    yield from shared_connection(tmp_path, monkeypatch)


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch, conn: Connection) -> dict[str, list[str]]:
    """A bootc image, a base disk and SSH, all without podman, to-disk or a guest."""
    calls: dict[str, list[str]] = {"pulled": [], "waited": [], "masters": []}
    info = podman.ImageInfo(
        id=IMAGE_ID, digest="sha256:" + "2" * 64, names=(IMAGE,), created="",
        size=400 << 20, architecture="amd64", os="linux", labels={"containers.bootc": "1"},
    )  # fmt: skip
    plain = dataclasses.replace(info, id="f" * 64, labels={})

    def ensure_image(ref: str, pull_policy: str = "missing", **_: object) -> podman.ImageInfo:
        calls["pulled"].append(ref)
        return plain if "plain" in ref else info

    monkeypatch.setattr(podman, "ensure_image", ensure_image)
    monkeypatch.setattr(provision, "image_info", lambda image: info)

    fake_base_disks(monkeypatch, 10 << 30)
    monkeypatch.setattr(
        lifecycle, "wait_for_ssh", lambda dom, v, timeout=0: calls["waited"].append(v.name)
    )
    monkeypatch.setattr(pblaunch, "ensure_master", lambda t, i, u: calls["masters"].append(i))
    return calls


def opts(**changes: Any) -> pb.RunOptions:
    return dataclasses.replace(pb.RunOptions(pool=POOL, timeout=5), **changes)


def test_run_creates_one_vm_per_image_and_reuses_it(
    conn: Connection, fakes: dict[str, list[str]]
) -> None:
    vm = pb.run(IMAGE, opts(), uri=URI)
    assert vm.id == "8ae7e19ce1c7"
    assert vm.name == "podman-bootc-8ae7e19ce1c7"
    assert vm.running
    assert vm.info.disk_size == 10 * GIB
    assert fakes["pulled"] == [IMAGE]
    assert fakes["waited"] == [vm.name]
    # pb list shows pb VMs only; libvirt list shows them too.
    provision.create_vm(conn, IMAGE, provision.RunOptions(name="plain-vm", pool=POOL, tpm=False))
    assert [v.id for v in pb.list_vms(URI)] == ["8ae7e19ce1c7"]
    assert {v.name for v in domains.list_vms(URI, all_states=True)} == {
        "plain-vm",
        "podman-bootc-8ae7e19ce1c7",
    }
    with pytest.raises(BcvkError, match="already running"):
        pb.run(IMAGE, opts(), uri=URI)
    stopped = pb.stop("8ae7", uri=URI)
    assert stopped.vm.state == "shut off"
    pool = conn.pool(POOL)
    assert pool is not None
    assert pool.volume("podman-bootc-8ae7e19ce1c7.qcow2") is not None  # stop keeps the disk
    # run by ID or image starts the same VM again; other disk inputs are refused.
    with pytest.raises(BcvkError, match="its disk is 10240 MiB, not 20480 MiB"):
        pb.run(IMAGE, opts(disk_size=20 * GIB), uri=URI)
    again = pb.run("8ae7e19ce1c7", opts(), uri=URI)
    assert again.vm.uuid == vm.vm.uuid
    assert again.running


def test_named_vms_rm_and_locks(conn: Connection, fakes: dict[str, list[str]]) -> None:
    first = pb.run(IMAGE, opts(name="web"), uri=URI)
    second = pb.run(IMAGE, opts(name="db"), uri=URI)
    assert first.id != second.id
    assert first.name == "web"
    assert pb.inspect("web", uri=URI).id == first.id
    with pytest.raises(BcvkError, match="is running"):
        pb.rm("web", uri=URI)
    with pbsession.VmLock(first.id) as session:
        session.shared()
        assert pb.inspect("web", uri=URI).in_use
        with pytest.raises(pb.InUseError, match="SSH session"):
            pb.rm("web", force=True, uri=URI)
        with pytest.raises(pb.InUseError):
            pb.stop("web", uri=URI)
        removed, skipped = pb.rm_all(force=True, uri=URI)
        assert [v.name for v in removed] == ["db"]
        assert [v.name for v in skipped] == ["web"]
    pb.rm("web", force=True, uri=URI)
    assert pb.list_vms(URI) == []
    assert conn.lookup("web") is None
    pool = conn.pool(POOL)
    assert pool is not None
    names = {v.name for v in pool.volumes()}
    assert "web.qcow2" not in names
    assert "bootc-base-0123456789abcdef.qcow2" not in names  # unused base disk freed
    assert pb.rm_all(force=True, uri=URI) == ([], [])


def test_rm_all_without_force_keeps_running_vms(
    conn: Connection, fakes: dict[str, list[str]]
) -> None:
    pb.run(IMAGE, opts(name="up"), uri=URI)
    pb.run(IMAGE, opts(name="down"), uri=URI)
    pb.stop("down", uri=URI)
    removed, skipped = pb.rm_all(uri=URI)
    assert [v.name for v in removed] == ["down"]
    assert [v.name for v in skipped] == ["up"]
    # the base disk is still used by "up"
    pool = conn.pool(POOL)
    assert pool is not None
    assert pool.volume("bootc-base-0123456789abcdef.qcow2") is not None


def test_not_bootc_and_unknown_ids(conn: Connection, fakes: dict[str, list[str]]) -> None:
    with pytest.raises(BcvkError, match="not a bootc image"):
        pb.run("localhost/plain:1", opts(), uri=URI)
    with pytest.raises(NotFoundError):
        pb.stop("nope", uri=URI)
    with pytest.raises(NotFoundError):
        pb.ssh("nope", ["true"], uri=URI)
    assert conn.lookup("podman-bootc-ffffffffffff") is None


def test_cloudinit_seed_is_attached_and_removed(
    conn: Connection,
    fakes: dict[str, list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = conn.pool(POOL) or conn.ensure_pool(POOL)
    seeds = tmp_path / "pool-dir"
    seeds.mkdir()
    ci = tmp_path / "ci"
    ci.mkdir()
    (ci / "user-data").write_text("#cloud-config\n")
    built: list[Path] = []

    def seed_volume(c: Connection, p: str, vm_id: str, source: Path) -> tuple[str, str]:
        iso = cloudinit.build_seed(source, seeds / "x.iso", instance_id="i", hostname="h")
        built.append(iso)
        name = f"podman-bootc-{vm_id}-cidata.iso"
        vol = pool.create_volume(
            f"<volume><name>{name}</name><capacity>1048576</capacity></volume>", name
        )
        return name, vol.path

    monkeypatch.setattr(pblaunch, "seed_volume", seed_volume)
    vm = pb.run(IMAGE, opts(cloudinit=ci), uri=URI)
    assert built
    assert vm.info.cloudinit_iso is not None
    xml = conn.get(vm.name).xml()
    assert "cidata.iso" in xml
    assert "device='cdrom'" in xml or 'device="cdrom"' in xml
    pb.rm(vm.id, force=True, uri=URI)
    assert pool.volume(f"podman-bootc-{vm.id}-cidata.iso") is None


def test_run_with_command_removes_the_vm_but_keeps_the_base_disk(
    conn: Connection, fakes: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    commands: list[list[str]] = []

    def session(vm: pb.PbVm, command: list[str], *, user: str | None) -> int:
        commands.append(list(command))
        return 7

    monkeypatch.setattr(pblaunch, "session", session)
    vm, status = pb.run_session(IMAGE, opts(), ["sh", "-c", "exit 7"], uri=URI)
    assert status == 7
    assert commands == [["sh", "-c", "exit 7"]]
    assert conn.lookup(vm.name) is None
    pool = conn.pool(POOL)
    assert pool is not None
    names = {v.name for v in pool.volumes()}
    assert f"{vm.name}.qcow2" not in names
    assert "bootc-base-0123456789abcdef.qcow2" in names  # cached for the next run
    # A VM that existed (stopped) before a COMMAND run is stopped again, not removed.
    kept = pb.run(IMAGE, opts(name="kept"), uri=URI)
    pb.stop("kept", uri=URI)
    _, status = pb.run_session("kept", opts(), ["true"], uri=URI)
    assert status == 7
    assert pb.inspect("kept", uri=URI).vm.state == "shut off"
    # --rm without a command: the session ends, the VM goes.
    _, status = pb.run_session("kept", opts(), [], rm=True, uri=URI)
    assert conn.lookup(kept.name) is None
    with pytest.raises(UsageError, match="--rm cannot be combined"):
        pb.run_session(IMAGE, opts(), [], rm=True, background=True, uri=URI)
