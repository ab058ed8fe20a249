"""libvirt's hermetic test driver, as the libvirt and pb unit tests use it."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from bcvk.libvirt import basedisks
from bcvk.libvirt.connection import Connection, connect

URI = "test:///default"
POOL = "default-pool"

NODE = """<node>
  <cpu><nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads>
    <mhz>2000</mhz><model>x86_64</model><active>2</active></cpu>
  <memory>8388608</memory>
{domains}
</node>
"""


def shared_connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Connection]:
    """A test:///default connection, emptied again afterwards.

    The driver keeps its state per process, so everything a test defined is
    removed (the driver's own domain "test" stays, running).
    """
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with connect(URI) as c:
        yield c
        for dom in c.domains():
            if dom.name != "test":
                if dom.is_active():
                    dom.destroy()
                dom.undefine()
        pool = c.pool(POOL)
        if pool is not None:
            for vol in pool.volumes():
                vol.delete()
        test = c.lookup("test")
        if test is not None and not test.is_active():
            test.start()


def domain_xml(name: str, metadata: ET.Element | None, running: bool) -> str:
    """A test-driver domain with bcvk METADATA (or none) in the given run state."""
    md = (
        ""
        if metadata is None
        else f"<metadata>{ET.tostring(metadata, encoding='unicode')}</metadata>"
    )
    state = "1" if running else "5"
    return (
        "<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>"
        f"<name>{name}</name>{md}<memory unit='MiB'>2048</memory><vcpu>2</vcpu>"
        "<os><type>hvm</type></os>"
        "<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='/pool/{name}.qcow2'/><target dev='vda' bus='virtio'/></disk></devices>"
        f"<test:runstate>{state}</test:runstate></domain>"
    )


def node_file(tmp_path: Path, domains: list[str]) -> str:
    """A test:/// URI for a node file holding DOMAINS."""
    path = tmp_path / "node.xml"
    path.write_text(NODE.format(domains="\n".join(domains)))
    return f"test://{path}"


def fake_base_disks(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    """basedisks.ensure makes an empty SIZE volume in POOL instead of running to-disk."""

    def ensure(c: Connection, pool: object, image: str, opts: object) -> object:
        target = c.ensure_pool(POOL)
        name = "bootc-base-0123456789abcdef.qcow2"
        vol = target.volume(name) or target.create_volume(
            f"<volume><name>{name}</name><capacity>{size}</capacity>"
            "<target><format type='qcow2'/></target></volume>",
            name,
        )
        return basedisks.BaseDisk(name, vol.path, size, "sha256:" + "01" * 32, True)

    monkeypatch.setattr(basedisks, "ensure", ensure)
