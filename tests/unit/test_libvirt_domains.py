"""Core logic of `bcvk libvirt` against libvirt's hermetic test:///default driver.

The test driver keeps its state per process, shared by every connection, so
each test removes what it defined (the driver's own domain "test" stays).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bcvk.errors import BcvkError, NotFoundError, UsageError
from bcvk.guest import mounts
from bcvk.guest.mounts import ShareKind
from bcvk.host import podman
from bcvk.libvirt import basedisks, domains, lifecycle, pending, provision
from bcvk.libvirt import vms as vmview
from bcvk.libvirt import xml as lx
from bcvk.libvirt.connection import (
    START_HINT,
    Connection,
    DomainNotFound,
    DomainRef,
    LibvirtError,
    Pool,
)
from bcvk.libvirt.uri import default_uri, parse_uri
from bcvk.values import GIB, Firmware, PortForward, validate_vm_name
from tests.conftest import Cli
from tests.unit.testdriver import POOL, URI, fake_base_disks, shared_connection

IMAGE = "localhost/bcvk/debian-bootc:12"


@pytest.fixture
def conn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Connection]:
    yield from shared_connection(tmp_path, monkeypatch)


@pytest.fixture
def fake_image(monkeypatch: pytest.MonkeyPatch, conn: Connection) -> podman.ImageInfo:
    """A bootc image and a base disk without podman or to-disk."""
    info = podman.ImageInfo(
        id="1" * 64,
        digest="sha256:" + "2" * 64,
        names=(IMAGE,),
        created="",
        size=400 << 20,
        architecture="amd64",
        os="linux",
        labels={"containers.bootc": "1"},
    )
    monkeypatch.setattr(provision, "image_info", lambda image: info)

    fake_base_disks(monkeypatch, 20 << 30)
    return info


def options(**changes: Any) -> provision.RunOptions:
    """RunOptions for the test driver; CHANGES in their CLI spellings (binds=…)."""
    values: dict[str, Any] = {"pool": POOL, "tpm": False, "timeout": 5, **changes}
    return domains.make_run_options(URI, **values)


# ------------------------------------------------------------------ pure helpers


@pytest.mark.parametrize(
    ("image", "taken", "expected"),
    [
        ("quay.io/fedora/fedora-bootc:42", set(), "fedora-bootc"),
        ("localhost/bcvk/debian-bootc:12", {"debian-bootc"}, "debian-bootc-2"),
        ("img", {"img", "img-2", "img-3"}, "img-4"),
        ("registry:5000/ns/my.image@sha256:abc", set(), "my-image"),
        ("x/--weird!!", set(), "weird"),
        ("localhost/:::", set(), "bootc"),
    ],
)
def test_derive_name(image: str, taken: set[str], expected: str) -> None:
    assert vmview.derive_name(image, taken) == expected


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 64, "a/b", "ü"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(UsageError):
        validate_vm_name(name)


def test_parse_bind() -> None:
    def parse(text: str, kind: ShareKind) -> tuple[str, str]:
        return mounts.parse_at(text, kind, local=False)

    assert parse("/a/b:/mnt/c", ShareKind.bind) == ("/a/b", "/mnt/c")
    assert parse("/C:/x:/y", ShareKind.bind) == ("/C:/x", "/y")
    assert parse("/h:tag1", ShareKind.volume) == ("/h", "tag1")
    for bad, kind in (
        ("/a", ShareKind.bind),
        ("/a:rel", ShareKind.bind_ro),
        ("/a:bad tag", ShareKind.volume),
    ):
        with pytest.raises(UsageError):
            parse(bad, kind)


def test_resources_and_instance_types() -> None:
    assert vmview.resources(None, None, None) == (4096, 2, None)
    assert vmview.resources(1 << 30, 3, None) == (1024, 3, None)
    assert vmview.resources(1 << 30, 3, "u1.small") == (2048, 1, "u1.small")
    with pytest.raises(UsageError, match="unknown instance type"):
        vmview.resources(None, None, "u9.huge")
    with pytest.raises(UsageError, match="must be between 128 MiB"):
        vmview.resources(16 << 20, None, None)
    with pytest.raises(UsageError, match="--cpus"):
        vmview.resources(None, 0, None)


def test_pick_ssh_port_skips_taken_and_busy_ports() -> None:
    low, high = vmview.SSH_PORT_RANGE
    taken = set(range(low, high + 1)) - {2500, 2501}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 2500))
        assert vmview.pick_ssh_port(taken, check_local=True) == 2501
        assert vmview.pick_ssh_port(taken - {2501} | {2501}, False) in (2500, 2501)
    with pytest.raises(BcvkError, match="no free SSH port"):
        vmview.pick_ssh_port(set(range(low, high + 1)), check_local=False)
    rng = random.Random(1)
    assert low <= vmview.pick_ssh_port(set(), False, rng) <= high


def test_readonly_mode() -> None:
    assert vmview.readonly_mode((11, 0, 0), False, False) == "libvirt"
    assert vmview.readonly_mode((9, 0, 0), True, True) == "host"
    assert vmview.readonly_mode((9, 0, 0), True, False) == "guest"
    assert vmview.readonly_mode((9, 0, 0), False, True) == "guest"
    wrapper = vmview.readonly_wrapper_text(Path("/opt/it's/virtiofsd"))
    assert wrapper.splitlines()[-1] == "exec '/opt/it'\"'\"'s/virtiofsd' \"$@\" --readonly"


def test_uri_parsing() -> None:
    remote = parse_uri("qemu+ssh://root@host.example:2022/system?keyfile=/k")
    assert (remote.transport, remote.user, remote.host, remote.port) == (
        "ssh",
        "root",
        "host.example",
        2022,
    )
    assert remote.remote
    assert not remote.session
    assert remote.ssh_jump == "root@host.example:2022"
    local = parse_uri("qemu:///session")
    assert not local.remote
    assert local.session
    assert local.ssh_jump is None
    assert parse_uri("qemu+ssh://root@localhost/system").local_host


def test_default_uri(monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "test:///default")
    assert default_uri() == "test:///default"
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_uri() == "qemu:///system"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert default_uri() == "qemu:///session"


def test_unreachable_libvirt_says_how_to_start_it() -> None:
    with pytest.raises(LibvirtError, match="cannot connect to libvirt") as info:
        Connection("qemu+unix:///system?socket=/nonexistent/libvirt-sock")
    assert info.value.hint == START_HINT


def test_base_disk_references_are_counted_from_backing_files() -> None:
    from bcvk.libvirt.connection import VolumeInfo

    def vol(name: str, backing: str | None = None) -> VolumeInfo:
        return VolumeInfo(name, f"/p/{name}", "qcow2", 1, 1, backing, None)

    infos = [
        vol("bootc-base-aaaaaaaaaaaaaaaa.qcow2"),
        vol("bootc-base-bbbbbbbbbbbbbbbb.qcow2"),
        vol("t1.qcow2", "/p/bootc-base-aaaaaaaaaaaaaaaa.qcow2"),
        vol("t2.qcow2", "/p/bootc-base-aaaaaaaaaaaaaaaa.qcow2"),
        vol("unrelated.img"),
    ]
    refs = basedisks.references(infos, {"tr": ["/p/bootc-base-bbbbbbbbbbbbbbbb.qcow2"]})
    assert refs == {
        "/p/bootc-base-aaaaaaaaaaaaaaaa.qcow2": ["t1.qcow2", "t2.qcow2"],
        "/p/bootc-base-bbbbbbbbbbbbbbbb.qcow2": ["domain:tr"],
    }


def test_base_disk_name_and_qcow2_size(tmp_path: Path) -> None:
    assert basedisks.volume_name("sha256:" + "0123456789abcdef" * 4) == (
        "bootc-base-0123456789abcdef.qcow2"
    )
    header = b"QFI\xfb" + b"\0" * 20 + (20 << 30).to_bytes(8, "big")
    (tmp_path / "d.qcow2").write_bytes(header)
    assert basedisks.qcow2_virtual_size(tmp_path / "d.qcow2") == 20 << 30
    (tmp_path / "raw").write_bytes(b"\0" * 64)
    with pytest.raises(BcvkError, match="not a qcow2"):
        basedisks.qcow2_virtual_size(tmp_path / "raw")


def test_the_base_disk_request_is_to_disks_cache_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bcvk import to_disk
    from bcvk.to_disk import options as disk_options

    info = podman.ImageInfo("id", "sha256:d", (), "", 1, "amd64", "linux", {})
    monkeypatch.setattr(podman, "local_image", lambda ref, bootc=False: info)
    opts = basedisks.InstallOptions(disk_size=20 << 30, kargs=("console=ttyS0",))
    key = disk_options.cache_key(
        IMAGE,
        "sha256:d",
        to_disk.DiskFormat.qcow2,
        20 << 30,
        to_disk.Options(
            format=to_disk.DiskFormat.qcow2,
            disk_size=20 << 30,
            kargs=("console=ttyS0",),
            guest_services=True,  # every base disk carries bcvk's guest services
        ),
    )
    req = basedisks.disk_request(IMAGE, tmp_path / "x.qcow2", opts)
    assert req.cache_hash == disk_options.cache_hash(key)
    bigger = dataclasses.replace(opts, disk_size=30 << 30)
    assert basedisks.disk_request(IMAGE, tmp_path / "x.qcow2", bigger).cache_hash != req.cache_hash


# ------------------------------------------------------------------ against test:///


def test_create_defines_a_domain_with_metadata_and_clone(
    conn: Connection, fake_image: podman.ImageInfo, tmp_path: Path
) -> None:
    vm = provision.create_vm(conn, IMAGE, options(labels=("ci",), ports=(PortForward(18080, 80),)))
    assert vm.name == "debian-bootc"
    assert vm.running
    md = vm.metadata
    assert md.source_image == IMAGE
    assert md.image_digest == fake_image.digest
    assert md.labels == ("ci",)
    assert md.disk_volume == "debian-bootc.qcow2"
    assert md.base_disk == "bootc-base-0123456789abcdef.qcow2"
    key = Path(md.ssh_private_key_path or "")
    assert key.is_file()
    assert key.stat().st_mode & 0o777 == 0o600
    assert key.parent.stat().st_mode & 0o777 == 0o700
    assert str(key).startswith(str(tmp_path / "data" / "bcvk" / "libvirt"))
    pool = conn.pool(POOL)
    assert pool is not None
    overlay = pool.volume("debian-bootc.qcow2")
    assert overlay is not None
    assert overlay.info().backing_path == "/default-pool/bootc-base-0123456789abcdef.qcow2"
    xml = conn.get(vm.name).xml()
    assert "PRIVATE KEY" not in xml
    assert key.read_text() not in xml
    # A second VM of the same image gets the next name and another clone.
    vm2 = provision.create_vm(conn, IMAGE, options(start=False))
    assert vm2.name == "debian-bootc-2"
    assert vm2.state == "shut off"
    assert vm2.metadata.ssh_port != md.ssh_port


def test_name_taken_replace_and_foreign_domains(
    conn: Connection, fake_image: podman.ImageInfo
) -> None:
    provision.create_vm(conn, IMAGE, options(name="vm1", start=False))
    with pytest.raises(BcvkError, match="already exists") as info:
        provision.create_vm(conn, IMAGE, options(name="vm1"))
    assert "--replace" in (info.value.hint or "")
    first_uuid = conn.get("vm1").uuid
    provision.create_vm(conn, IMAGE, options(name="vm1", replace=True, start=False))
    assert conn.get("vm1").uuid != first_uuid
    # "test" is the driver's own domain: bcvk never replaces or removes it.
    with pytest.raises(BcvkError, match="bcvk did not create it"):
        provision.create_vm(conn, IMAGE, options(name="test", replace=True))
    with pytest.raises(BcvkError, match="not created by bcvk"):
        lifecycle.remove(conn, "test", force=True)
    assert conn.lookup("test") is not None
    assert [v.name for v in vmview.all_vms(conn)] == ["vm1"]


def test_port_in_use_is_refused(conn: Connection, fake_image: podman.ImageInfo) -> None:
    provision.create_vm(conn, IMAGE, options(name="a", ports=(PortForward(18081, 80),)))
    with pytest.raises(BcvkError, match="port 18081 is already in use"):
        provision.create_vm(conn, IMAGE, options(name="b", ports=(PortForward(18081, 80),)))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        busy.listen()
        with pytest.raises(BcvkError, match=f"port {port} is already in use"):
            provision.create_vm(conn, IMAGE, options(name="c", ports=(PortForward(port, 80),)))
    assert conn.lookup("b") is None
    assert conn.lookup("c") is None


def test_failed_run_leaves_nothing_behind(
    conn: Connection, fake_image: podman.ImageInfo, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def boom(self: DomainRef) -> None:
        raise LibvirtError("starting domain: simulated failure")

    monkeypatch.setattr(DomainRef, "start", boom)
    with pytest.raises(LibvirtError, match="simulated"):
        provision.create_vm(conn, IMAGE, options(name="broken"))
    assert conn.lookup("broken") is None
    pool = conn.pool(POOL)
    assert pool is not None
    assert pool.volume("broken.qcow2") is None
    keys = tmp_path / "data" / "bcvk" / "libvirt"
    assert not keys.exists() or list(keys.iterdir()) == []


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (the undo is switched off)."""


def _kill_during_start(monkeypatch: pytest.MonkeyPatch) -> None:
    def killed(self: DomainRef) -> None:
        raise Killed()

    monkeypatch.setattr(DomainRef, "start", killed)
    monkeypatch.setattr(pending.Undo, "rollback", lambda self: None)
    monkeypatch.setattr(pending.Journal, "close", lambda self: None)


def _as_dead(journal_file: Path) -> None:
    """Rewrite the journal as if its process had died (a pid with another start time)."""
    data = json.loads(journal_file.read_text())
    data["process"]["started"] += 1
    journal_file.write_text(json.dumps(data))


def test_a_killed_run_is_undone_by_the_next_command(
    conn: Connection, fake_image: podman.ImageInfo, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    keep = provision.create_vm(conn, IMAGE, options(name="keep"))
    with monkeypatch.context() as m:
        _kill_during_start(m)
        with pytest.raises(Killed):
            provision.create_vm(conn, IMAGE, options(name="killed"))
    # What SIGKILL leaves: a defined domain, its disk, its key, and the journal.
    journals = list(pending.root().glob("pending-*.json"))
    assert len(journals) == 1
    killed_uuid = conn.get("killed").uuid
    assert vmview.key_dir(killed_uuid).is_dir()
    pool = conn.pool(POOL)
    assert pool is not None
    assert pool.volume("killed.qcow2") is not None
    # Another URI's sweep does not touch it; nor does this one while the run lives.
    assert pending.sweep(conn) == []
    _as_dead(journals[0])
    done = pending.sweep(conn)
    assert sorted(d.split()[0] for d in done) == ["domain", "key", "volume"]
    assert conn.lookup("killed") is None
    assert pool.volume("killed.qcow2") is None
    assert not vmview.key_dir(killed_uuid).exists()
    assert list(pending.root().glob("*pending-*")) == []
    # The VM that was complete is untouched.
    assert conn.lookup("keep") is not None
    assert pool.volume("keep.qcow2") is not None
    assert vmview.key_dir(conn.get("keep").uuid).is_dir()
    assert keep.name == "keep"


def test_a_journalled_volume_now_used_by_another_vm_is_kept(
    conn: Connection, fake_image: podman.ImageInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as m:
        _kill_during_start(m)
        with pytest.raises(Killed):
            provision.create_vm(conn, IMAGE, options(name="again"))
    journal = next(pending.root().glob("pending-*.json"))
    # Someone removed the half-made domain by hand and made a new VM of that name.
    lifecycle.remove(conn, "again", force=True)
    provision.create_vm(conn, IMAGE, options(name="again"))
    _as_dead(journal)
    pending.sweep(conn)
    pool = conn.pool(POOL)
    assert pool is not None
    assert conn.lookup("again") is not None
    assert pool.volume("again.qcow2") is not None


def test_journals_of_other_uris_are_left_alone(conn: Connection) -> None:
    journal = pending.Journal("qemu:///elsewhere")
    journal.note("key", "0" * 8)
    _as_dead(journal.path)
    assert pending.sweep(conn) == []
    assert journal.path.exists()


def test_mount_units_as_credentials_for_new_systemd(
    conn: Connection, fake_image: podman.ImageInfo, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(provision, "_guest_systemd", lambda image: 257)
    share = tmp_path / "share"
    share.mkdir()
    vm = provision.create_vm(
        conn, IMAGE, options(name="m", binds=(f"{share}:/mnt/rw",), binds_ro=(f"{share}:/mnt/ro",))
    )
    dom = lx.Domain.from_xml(conn.get("m").xml())
    assert [f.tag for f in dom.filesystems] == ["bcvk-bind-0", "bcvk-bind-ro-0"]
    assert all(f.source == str(share) for f in dom.filesystems)
    assert any("systemd.extra-unit.mnt-ro.mount=" in s for s in dom.oem_strings)
    assert vm.metadata.readonly_enforcement in ("host", "guest")
    if vm.metadata.readonly_enforcement == "host":
        wrapper = dom.filesystems[1].binary or ""
        assert "--readonly" in Path(wrapper).read_text()


def test_missing_bind_source_is_refused(conn: Connection, fake_image: podman.ImageInfo) -> None:
    # Refused while parsing the options: before libvirt or the image is asked.
    with pytest.raises(UsageError, match="no such directory"):
        options(binds=("/nonexistent/dir:/mnt",))


def test_firmware_choices() -> None:
    with pytest.raises(UsageError, match="signed boot chain"):
        provision.validate(options(firmware="uefi-secure"))
    # bios depends on the image (create_vm asks it), so it passes here
    provision.validate(options(firmware="bios"))
    provision.validate(options(firmware="uefi-insecure"))


def test_bios_is_refused_when_auto_would_build_natively(
    conn: Connection, fake_image: podman.ImageInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []

    def has_bootc(image_id: str) -> bool:
        asked.append(image_id)
        return False

    monkeypatch.setattr(provision, "_has_bootc", has_bootc)
    built: list[str] = []
    monkeypatch.setattr(basedisks, "ensure", lambda *args: built.append("base disk"))
    with pytest.raises(UsageError) as caught:
        provision.create_vm(conn, IMAGE, options(name="b", firmware="bios"))
    assert caught.value.message == (
        "--firmware bios is not supported by the native installer, which --installer auto "
        f"picks for {IMAGE} (it has no /usr/bin/bootc)"
    )
    assert caught.value.hint
    assert "GRUB" in caught.value.hint
    assert asked == [fake_image.id]
    assert built == []
    assert conn.lookup("b") is None


def test_bios_is_allowed_when_auto_is_the_bootc_installer(
    conn: Connection, fake_image: podman.ImageInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(provision, "_has_bootc", lambda image_id: True)
    provision.create_vm(conn, IMAGE, options(name="b", firmware="bios"))
    dom = lx.Domain.from_xml(conn.get("b").xml())
    assert dom.os.firmware is Firmware.bios
    assert dom.os.loader is None


def test_uefi_does_not_read_the_image(
    conn: Connection, fake_image: podman.ImageInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unexpected(image_id: str) -> bool:
        raise AssertionError("the image was mounted for a UEFI VM")

    monkeypatch.setattr(provision, "_has_bootc", unexpected)
    provision.create_vm(conn, IMAGE, options(name="u"))


def test_list_filter_inspect_and_remove(conn: Connection, fake_image: podman.ImageInfo) -> None:
    a = provision.create_vm(conn, IMAGE, options(name="a", labels=("x",)))
    provision.create_vm(conn, IMAGE, options(name="b", labels=("y",), start=False))
    vms = vmview.all_vms(conn)
    assert [v.name for v in vmview.filter_vms(vms, all_states=False, label=None)] == ["a"]
    assert [v.name for v in vmview.filter_vms(vms, all_states=True, label=None)] == ["a", "b"]
    assert [v.name for v in vmview.filter_vms(vms, all_states=True, label="y")] == ["b"]
    data = a.to_json()
    assert {
        "name",
        "state",
        "image",
        "ssh_port",
        "ssh_private_key_path",
        "ssh_user",
        "ssh_host",
        "labels",
        "disk_path",
    } <= set(data)
    with pytest.raises(BcvkError, match="is running"):
        lifecycle.remove(conn, "a")
    plan = lifecycle.remove(conn, "a", force=True)
    assert plan.volume is not None
    assert plan.volume.endswith("/a.qcow2")
    assert conn.lookup("a") is None
    pool = conn.pool(POOL)
    assert pool is not None
    assert pool.volume("a.qcow2") is None
    assert plan.key_dir is not None
    assert not Path(plan.key_dir).exists()
    assert [v.name for v in vmview.all_vms(conn)] == ["b"]


def test_domains_deleted_behind_our_back(
    conn: Connection, fake_image: podman.ImageInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    provision.create_vm(conn, IMAGE, options(name="gone", start=False))
    provision.create_vm(conn, IMAGE, options(name="stays", start=False))
    real_xml = DomainRef.xml

    def racing(self: DomainRef, inactive: bool = False) -> str:
        if self.name == "gone":
            raise DomainNotFound("domain 'gone' disappeared")
        return real_xml(self, inactive)

    monkeypatch.setattr(DomainRef, "xml", racing)
    assert [v.name for v in vmview.all_vms(conn)] == ["stays"]
    monkeypatch.setattr(DomainRef, "xml", real_xml)
    dom = conn.get("gone")
    conn.raw.lookupByName("gone").undefine()  # someone else removes it
    with pytest.raises(DomainNotFound):
        dom.state()
    with pytest.raises(NotFoundError, match="no domain named 'gone'"):
        lifecycle.remove(conn, "gone", force=True)
    lifecycle.stop_domain(dom)  # copes: nothing to stop


def test_stop_start_and_rm_all(conn: Connection, fake_image: podman.ImageInfo) -> None:
    provision.create_vm(conn, IMAGE, options(name="s1", labels=("grp",)))
    provision.create_vm(conn, IMAGE, options(name="s2", labels=("grp",)))
    provision.create_vm(conn, IMAGE, options(name="other", start=False))
    dom = conn.get("s1")
    lifecycle.stop_domain(dom)
    assert dom.state() == "shut off"
    lifecycle.stop_domain(dom)  # already stopped: a no-op
    lifecycle.stop_domain(conn.get("s2"), force=True)
    assert conn.get("s2").state() == "shut off"
    conn.get("s2").start()
    removed, skipped = domains.rm_all(uri=URI, label="grp")
    assert (removed, skipped) == (["s1"], ["s2"])
    removed, skipped = domains.rm_all(uri=URI, label="grp", force=True)
    assert (removed, skipped) == (["s2"], [])
    assert [v.name for v in vmview.all_vms(conn)] == ["other"]
    assert conn.lookup("test") is not None


def test_status_on_the_test_driver(conn: Connection, fake_image: podman.ImageInfo) -> None:
    provision.create_vm(conn, IMAGE, options(name="st"))
    data = domains.status(URI)
    assert data["libvirt_version"]
    assert data["domain_count"] == 1
    assert data["running_domain_count"] == 1
    assert data["supports_readonly_virtiofs"] is (
        tuple(int(x) for x in str(data["libvirt_version"]).split(".")) >= (11, 0, 0)
    )
    assert data["readonly_bind_enforcement"] in ("libvirt", "host", "guest")


# ------------------------------------------------------------------ copies of bcvk VMs


def clone(conn: Connection, name: str, new: str, disk: str | None = None) -> None:
    """A copy of domain NAME as virt-clone makes one: new name, UUID and disk; same metadata."""
    import uuid

    text = conn.get(name).xml(inactive=True)
    text = text.replace(f"<name>{name}</name>", f"<name>{new}</name>")
    text = re.sub(r"<uuid>[^<]+</uuid>", f"<uuid>{uuid.uuid4()}</uuid>", text)
    if disk is not None:
        text = re.sub(r"<source file='[^']+'", f"<source file='{disk}'", text)
        text = re.sub(r'<source file="[^"]+"', f'<source file="{disk}"', text)
    conn.define(text)


def test_rm_of_a_clone_leaves_the_originals_disk_and_key(
    conn: Connection, fake_image: podman.ImageInfo
) -> None:
    orig = provision.create_vm(conn, IMAGE, options(name="orig", start=False))
    key = Path(orig.metadata.ssh_private_key_path or "")
    pool = conn.pool(POOL)
    assert pool is not None
    own = pool.create_volume(
        "<volume><name>copy.qcow2</name><capacity>1048576</capacity></volume>", "copy.qcow2"
    )
    clone(conn, "orig", "copy", own.path)
    # Every verb but rm -f refuses the copy: its metadata names orig's key.
    with pytest.raises(BcvkError, match="carries the metadata of VM 'orig'"):
        vmview.get_vm(conn, "copy")
    with pytest.raises(BcvkError, match="it is a copy"):
        lifecycle.remove(conn, "copy")
    plan = lifecycle.remove(conn, "copy", force=True)
    assert plan.key_dir is None
    assert conn.lookup("copy") is None
    assert pool.volume("copy.qcow2") is None  # its own disk went
    assert pool.volume("orig.qcow2") is not None  # the original's stays
    assert key.is_file()
    assert vmview.get_vm(conn, "orig")[1].copied_from is None


def test_rm_never_follows_metadata_to_files_outside_bcvks_own(
    conn: Connection, fake_image: podman.ImageInfo, tmp_path: Path
) -> None:
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "id_ed25519").write_text("not yours")
    log = tmp_path / "evil-console.log"
    log.write_text("secret")
    vm = provision.create_vm(conn, IMAGE, options(name="evil", start=False))
    text = conn.get("evil").xml(inactive=True)
    for old, new in (
        (vm.metadata.ssh_private_key_path or "", f"{victim}/id_ed25519"),
        ("evil.qcow2</bootc:disk-volume>", "precious.img</bootc:disk-volume>"),
    ):
        text = text.replace(old, new)
    text = text.replace("</bootc:container>", f"<bootc:console-log>{log}</bootc:console-log>"
                        "</bootc:container>")  # fmt: skip
    conn.define(text)
    lifecycle.remove(conn, "evil", force=True)
    assert (victim / "id_ed25519").read_text() == "not yours"
    assert log.read_text() == "secret"


def test_network_none_has_no_nic_and_no_ssh_port(
    conn: Connection, fake_image: podman.ImageInfo
) -> None:
    vm = provision.create_vm(conn, IMAGE, options(name="offline", network="none"))
    assert vm.metadata.ssh_port is None
    assert "<interface" not in conn.get("offline").xml()  # nor libvirt's own NIC
    # (The test driver drops <qemu:commandline>: the builder shows the QEMU side.)
    spec = lx.DomainSpec(name="offline", memory_mib=1024, vcpus=1, disk_path="/d.qcow2")
    assert lx.build(dataclasses.replace(spec, ssh_port=0)).qemu_args == ()
    assert "-netdev" in lx.build(spec).qemu_args


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"network": "none", "ports": ["8080:80"]}, "so -p/--port cannot work"),
        ({"network": "none", "ssh_wait": True}, "so --ssh/--ssh-wait cannot work"),
        ({"network": "bridge"}, "--network bridge is not supported"),
        ({"network": "bridge=br0"}, "--network bridge is not supported"),
        ({"network": "wifi"}, "invalid --network 'wifi'"),
    ],
)
def test_network_choices_are_checked_before_anything_is_made(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(UsageError) as caught:
        provision.validate(options(**changes))
    assert message in caught.value.message
    assert caught.value.hint


def test_list_volumes_names_base_disks_vm_disks_and_their_users(
    conn: Connection, fake_image: podman.ImageInfo
) -> None:
    provision.create_vm(conn, IMAGE, options(name="v1"))
    provision.create_vm(conn, IMAGE, options(name="v2", start=False))
    pool = conn.pool(POOL)
    assert pool is not None
    pool.create_volume(
        "<volume><name>hand.raw</name><capacity>1024</capacity></volume>", "hand.raw"
    )
    rows = {r.name: r for r in domains.list_volumes(URI, POOL)}
    assert set(rows) == {"bootc-base-0123456789abcdef.qcow2", "v1.qcow2", "v2.qcow2"}
    base = rows["bootc-base-0123456789abcdef.qcow2"]
    assert (base.kind, base.vms, base.images) == ("base", ("v1", "v2"), (IMAGE,))
    assert (rows["v1.qcow2"].kind, rows["v1.qcow2"].vms) == ("vm", ("v1",))
    assert rows["v1.qcow2"].backing == "/default-pool/bootc-base-0123456789abcdef.qcow2"
    every = {r.name: r.kind for r in domains.list_volumes(URI, POOL, all_volumes=True)}
    assert every["hand.raw"] == "other"
    assert domains.list_volumes(URI, POOL, source_image="localhost/other:1") == []
    assert len(domains.list_volumes(URI, POOL, source_image=IMAGE)) == 3
    with pytest.raises(NotFoundError, match="storage pool 'nope' does not exist"):
        domains.list_volumes(URI, "nope")


def test_to_base_disk_is_the_disk_run_clones(
    conn: Connection, fake_image: podman.ImageInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[basedisks.InstallOptions] = []
    fake = basedisks.ensure

    def ensure(
        c: Connection, pool: Pool, image: str, opts: basedisks.InstallOptions
    ) -> basedisks.BaseDisk:
        asked.append(opts)
        return fake(c, pool, image, opts)

    monkeypatch.setattr(basedisks, "ensure", ensure)
    base = domains.to_base_disk(IMAGE, uri=URI, pool=POOL)
    vm = provision.create_vm(conn, IMAGE, options(name="after"))
    assert vm.metadata.base_disk == base.volume
    # the same to-disk choices, bcvk's console karg included: the same cache key
    assert asked[0] == asked[1]
    assert asked[0].kargs == ("console=ttyS0",)
    with pytest.raises(UsageError, match="invalid kernel argument"):
        domains.to_base_disk(IMAGE, uri=URI, pool=POOL, kargs=["a\nb"])


def test_libvirt_json_outputs_match_their_schemas(
    conn: Connection, fake_image: podman.ImageInfo, cli: Cli
) -> None:
    from tests import schemas

    provision.create_vm(conn, IMAGE, options(name="j1", labels=("ci",)))
    provision.create_vm(conn, IMAGE, options(name="j2", network="none", start=False))

    def shown(*args: str) -> Any:
        return json.loads(cli("libvirt", "-c", URI, *args, check=True).stdout)

    rows = schemas.check("libvirt-list", shown("list", "-a", "--format", "json"))
    assert {r["name"] for r in rows} == {"j1", "j2"}
    schemas.check("libvirt-list", shown("list", "j1", "--format", "json", "--include-private-key"))
    volumes = schemas.check("libvirt-list-volumes", shown("list-volumes", "--pool", POOL, "--json"))
    assert {v["kind"] for v in volumes} == {"base", "vm"}
    schemas.check(
        "libvirt-base-disks", shown("base-disks", "list", "--pool", POOL, "--format", "json")
    )
    schemas.check("libvirt-print-firmware", shown("print-firmware", "--format", "json"))
    # A schema catches drift: a key bcvk does not document is an error.
    with pytest.raises(AssertionError, match="Additional properties"):
        schemas.check("libvirt-list", [{**rows[0], "surprise": 1}])


def test_every_output_schema_is_a_schema_and_is_used() -> None:
    from tests import schemas
    from tests.conftest import ROOT

    names = sorted(p.name.removesuffix(".schema.json") for p in schemas.SCHEMAS.glob("*.json"))
    used = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    for name in names:
        if name != "bcvk.toml":  # checked against the parser in test_project
            schemas.validator(name)
            pattern = rf'schemas\.check\(\s*"{re.escape(name)}"'
            assert re.search(pattern, used), f"no test validates output against {name}"


def test_virtiofsd_flag_serves_the_shares(
    conn: Connection, fake_image: podman.ImageInfo, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(provision, "_guest_systemd", lambda image: 257)
    share = tmp_path / "share"
    share.mkdir()
    mine = tmp_path / "my-virtiofsd"
    mine.write_text("#!/bin/sh\nexit 0\n")
    mine.chmod(0o755)
    binds = {"binds": (f"{share}:/mnt/rw",), "binds_ro": (f"{share}:/mnt/ro",)}
    provision.create_vm(conn, IMAGE, options(name="own", virtiofsd=str(mine), **binds))
    rw, ro = lx.Domain.from_xml(conn.get("own").xml()).filesystems
    assert rw.binary == str(mine)
    # read-only: virtiofsd itself, or a wrapper of its own that runs it with --readonly
    assert ro.binary == str(mine) or str(mine) in Path(ro.binary or "").read_text()
    with pytest.raises(NotFoundError, match="--virtiofsd /nowhere is not an executable file"):
        provision.validate(options(virtiofsd="/nowhere"))


def test_secure_boot_keys_mean_uefi_secure_and_are_checked_first(tmp_path: Path) -> None:
    from tests.unit.test_to_disk_pure import sb_keys

    keys = sb_keys(tmp_path)
    opts = options(secure_boot_keys=str(keys))
    assert opts.firmware is Firmware.uefi_secure
    assert opts.secure_boot_keys is not None
    assert opts.secure_boot_keys.db_key == keys / "db.key"
    provision.validate(opts)
    with pytest.raises(UsageError, match="needs --firmware uefi-secure, not bios"):
        provision.validate(options(secure_boot_keys=str(keys), firmware="bios"))
    with pytest.raises(UsageError) as caught:
        provision.validate(options(firmware="uefi-secure"))
    assert "--secure-boot-keys DIR" in (caught.value.hint or "")
    with pytest.raises(NotFoundError, match="no such directory"):
        options(secure_boot_keys=str(tmp_path / "none"))
    # The keys shape the base disk: a signed one is another cache entry.
    plain = provision.install_options(GIB, None, None, ())
    signed = provision.install_options(GIB, None, None, (), opts.secure_boot_keys)
    assert signed.to_disk_options().secure_boot_keys == opts.secure_boot_keys
    assert plain.to_disk_options().secure_boot_keys is None


def test_log_dir_and_firmware_log(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    opts = options(log_dir=f"journal={logs}", firmware_log=True)
    assert opts.log_dir is not None
    assert not opts.log_dir.console
    provision.validate(opts)
    with pytest.raises(UsageError, match="both name the console's log"):
        provision.validate(options(log_dir=str(logs), console_log=tmp_path / "c.log"))
    with pytest.raises(UsageError, match="remote host"):
        domains.make_run_options("qemu+ssh://host/system", log_dir=str(logs))
    with pytest.raises(UsageError, match="does not exist"):
        options(log_dir=str(tmp_path / "a" / "b"))


def test_a_failed_run_takes_back_its_log_dir(tmp_path: Path) -> None:
    """The files a run started in --log-dir, and the directory it made, go with it;
    what was there before stays."""
    logs = tmp_path / "logs"
    opts = options(log_dir=str(logs), firmware_log=True)
    undo = pending.Undo(pending.Journal("test:///default"))
    provision.log_files(opts, undo)
    assert logs.is_dir()
    (logs / "journal.json").write_text("{}\n")
    undo.rollback()
    assert not logs.exists()
    logs.mkdir()
    (logs / "journal.json").write_text("old\n")
    undo = pending.Undo(pending.Journal("test:///default"))
    provision.log_files(opts, undo)
    (logs / "firmware.txt").write_text("new\n")
    undo.rollback()
    assert sorted(p.name for p in logs.iterdir()) == ["journal.json"]


def test_bind_storage_ro_is_a_read_only_share_at_upstreams_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(podman, "graph_root", lambda: tmp_path)
    opts = options(bind_storage_ro=True)
    (share,) = opts.shares
    assert (share.kind, share.source, share.target, share.tag) == (
        ShareKind.bind_ro,
        str(tmp_path),
        "/run/host-container-storage",
        "hoststorage",
    )
    assert lifecycle.has_host_storage(opts.shares)
    assert not lifecycle.has_host_storage(options().shares)
    with pytest.raises(UsageError, match="remote host"):
        domains.make_run_options("qemu+ssh://host/system", bind_storage_ro=True)
    monkeypatch.setattr(podman, "graph_root", lambda: tmp_path / "none")
    with pytest.raises(NotFoundError, match="does not exist"):
        options(bind_storage_ro=True)
