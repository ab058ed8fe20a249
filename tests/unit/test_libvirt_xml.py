"""Domain XML model: golden files, round trips, metadata parsing, guest mounts."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

from bcvk.errors import UsageError
from bcvk.guest import mounts
from bcvk.guest.mounts import Share, ShareKind
from bcvk.libvirt import xml as lx
from bcvk.values import Firmware, PortForward

DATA = Path(__file__).resolve().parent.parent / "data" / "libvirt"
UUID = "00000000-0000-4000-8000-000000000001"


def full_metadata() -> lx.Metadata:
    return lx.Metadata(
        source_image="localhost/bcvk/debian-bootc:12",
        image_digest="sha256:" + "ab" * 32,
        ssh_port=2345,
        ssh_private_key_path="/home/u/.local/share/bcvk/libvirt/x/id_ed25519",
        ssh_generated=True,
        memory_mb=4096,
        vcpus=2,
        disk_size_gb=20,
        filesystem="ext4",
        instance_type=None,
        labels=("ci", "web"),
        firmware="uefi",
        ports=(PortForward(8080, 80), PortForward(2022, 22)),
        mounts=(
            Share(ShareKind.bind, "/srv/src", "/var/src", "bcvk-bind-0"),
            Share(ShareKind.bind_ro, "/srv/data", "/mnt/data", "bcvk-bind-ro-0"),
            Share(ShareKind.volume, "/srv/raw", "rawtag", "rawtag"),
        ),
        readonly_enforcement="host",
        base_disk="bootc-base-0123456789abcdef.qcow2",
        disk_volume="t1.qcow2",
        pool="default",
        cache_hash="sha256:" + "01" * 32,
        console_log="/var/log/libvirt/qemu/t1-console.log",
        tpm=True,
        created="2026-01-02T03:04:05+00:00",
        created_by="bcvk 0.1.0",
    )


def full_spec(**changes: object) -> lx.DomainSpec:
    fields: dict[str, object] = dict(
        name="t1",
        uuid=UUID,
        memory_mib=4096,
        vcpus=2,
        disk_path="/var/lib/libvirt/images/t1.qcow2",
        domain_type="qemu",
        ssh_port=2345,
        ports=(PortForward(8080, 80), PortForward(2022, 22)),
        filesystems=(
            lx.Filesystem("/srv/src", "bcvk-bind-0", binary="/opt/virtiofsd"),
            lx.Filesystem("/srv/data", "bcvk-bind-ro-0", binary="/root/.local/share/bcvk/ro"),
        ),
        credentials=("io.systemd.credential.binary:tmpfiles.extra=ZmFrZQ==",),
        tpm=True,
        console_log="/var/log/libvirt/qemu/t1-console.log",
        firmware_log=lx.FirmwareLog("/srv/logs/firmware.txt"),
        channels=(
            lx.Channel("org.bcvk.journal", "/srv/logs/journal.json"),
            lx.Channel("org.bcvk.journal.initrd", "/srv/logs/journal-initrd.json"),
        ),
        metadata=full_metadata(),
    )
    fields.update(changes)
    return lx.DomainSpec(**fields)  # type: ignore[arg-type]


def test_full_domain_matches_golden(golden: Callable[[str, str], None]) -> None:
    golden("libvirt-domain-full.xml", lx.build(full_spec()).to_xml())


def test_minimal_kvm_domain_matches_golden(golden: Callable[[str, str], None]) -> None:
    spec = lx.DomainSpec(
        name="m",
        uuid=UUID,
        memory_mib=2048,
        vcpus=1,
        disk_path="/p/m.qcow2",
        domain_type="kvm",
        tpm=False,
        metadata=lx.Metadata(source_image="quay.io/fedora/fedora-bootc:42", ssh_port=2222),
    )
    golden("libvirt-domain-minimal.xml", lx.build(spec).to_xml())


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"firmware": Firmware.bios, "tpm": False, "credentials": ()},
        {"firmware": Firmware.uefi_secure},
        {"transient_disk": True, "console_log": None, "ports": ()},
        {"firmware_log": lx.FirmwareLog(None), "channels": ()},
        {"domain_type": "kvm", "filesystems": ()},
        {"metadata": None},
    ],
)
def test_domain_round_trips(changes: dict[str, object]) -> None:
    domain = lx.build(full_spec(**changes))
    assert lx.Domain.from_xml(domain.to_xml()) == domain


def test_uefi_disables_secure_boot_and_nic_has_explicit_q35_address() -> None:
    root = lx.build(full_spec()).to_element()
    feature = root.find("os/firmware/feature")
    assert feature is not None
    assert feature.attrib == {"enabled": "no", "name": "secure-boot"}
    args = [a.get("value") for a in root.iter(f"{{{lx.QEMU_NS}}}arg")]
    assert "virtio-net-pci,netdev=bcvk0,bus=pcie.0,addr=0x10" in args
    netdev = args[args.index("-netdev") + 1]
    assert netdev == (
        "user,id=bcvk0,hostfwd=tcp:127.0.0.1:2345-:22,"
        "hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=tcp:127.0.0.1:2022-:22"
    )
    # every forward is loopback-only
    assert netdev.count("hostfwd=tcp:127.0.0.1:") == netdev.count("hostfwd=")
    assert root.get("type") == "qemu"
    assert root.find("cpu") is None  # TCG: libvirt's default model, the fastest here


def test_xml_never_contains_a_private_key() -> None:
    text = lx.build(full_spec()).to_xml()
    assert "PRIVATE KEY" not in text
    assert "ssh-private-key-path" in text


def test_bios_has_no_efi_and_secure_adds_smm() -> None:
    bios = lx.build(full_spec(firmware=Firmware.bios)).to_element()
    assert bios.find("os").get("firmware") is None  # type: ignore[union-attr]
    assert bios.find("os/firmware") is None
    secure = lx.build(full_spec(firmware=Firmware.uefi_secure)).to_element()
    assert secure.find("features/smm") is not None
    assert secure.find("os/firmware/feature").get("enabled") == "yes"  # type: ignore[union-attr]


def test_parses_what_libvirt_returns() -> None:
    """A live `virsh dumpxml` of a bcvk domain (libvirt 9.0) parses to the right facts."""
    dom = lx.Domain.from_xml((DATA / "live-domain.xml").read_text())
    assert dom.name == "t1"
    assert dom.memory_mib == 2048  # libvirt reports KiB
    assert dom.type == "qemu"
    assert dom.os.firmware is Firmware.uefi  # expanded loader, secure-boot off
    assert dom.os.machine == "q35"  # from pc-q35-7.2
    assert [d.source for d in dom.disks] == ["/var/lib/libvirt/images/t1.qcow2"]
    assert dom.tpm == lx.Tpm("tpm-crb", "2.0")
    assert dom.metadata is not None
    assert dom.metadata.ssh_port == 2600
    assert dom.metadata.base_disk == "bootc-base-f0648ec073ca308b.qcow2"
    assert dom.oem_strings[0].startswith("io.systemd.credential.binary:tmpfiles.extra=")
    assert "-netdev" in dom.qemu_args


def test_metadata_round_trip_and_upstream_names() -> None:
    md = full_metadata()
    element = md.to_element()
    assert lx.Metadata.from_element(element) == md
    names = {child.tag.split("}")[1] for child in element}
    assert {"source-image", "image-digest", "ssh-port", "memory-mb", "vcpus", "label"} <= names
    labels = element.find(f"{{{lx.BOOTC_NS}}}label")
    assert labels is not None
    assert labels.text == "ci,web"


def test_metadata_from_the_metadata_api_without_prefixes() -> None:
    # virDomainGetMetadata returns the element with a default namespace.
    text = (
        '<container xmlns="https://github.com/containers/bootc">'
        "<source-image>img:1</source-image><ssh-port>2400</ssh-port>"
        "<label>a,b</label></container>"
    )
    md = lx.metadata_from_xml(text)
    assert md is not None
    assert (md.source_image, md.ssh_port, md.labels) == ("img:1", 2400, ("a", "b"))
    bare = "<container><source-image>img:2</source-image><vcpus>4</vcpus></container>"
    md2 = lx.metadata_from_xml(bare)
    assert md2 is not None
    assert md2.vcpus == 4


def test_metadata_tolerates_upstream_values_and_junk() -> None:
    text = (
        f'<bootc:container xmlns:bootc="{lx.BOOTC_NS}">'
        "<bootc:source-image>x</bootc:source-image>"
        "<bootc:disk-size-gb>20G</bootc:disk-size-gb>"
        "<bootc:ssh-private-key-base64>c2VjcmV0</bootc:ssh-private-key-base64>"
        "<bootc:port-forward>nonsense</bootc:port-forward>"
        '<bootc:mount kind="weird" source="/a" target="/b" tag="t"/>'
        "<bootc:ssh-port>abc</bootc:ssh-port>"
        "</bootc:container>"
    )
    md = lx.metadata_from_xml(text)
    assert md is not None
    assert md.disk_size_gb == 20
    assert md.ports == ()
    assert md.mounts == ()
    assert md.ssh_port is None
    assert "c2VjcmV0" not in str(md.to_json())


@pytest.mark.parametrize("text", ["", "<notxml", "<container><vcpus>2</vcpus></container>"])
def test_no_metadata_means_not_ours(text: str) -> None:
    assert lx.metadata_from_xml(text) is None


def test_domain_without_bcvk_metadata() -> None:
    dom = lx.Domain.from_xml("<domain type='kvm'><name>other</name><memory>1024</memory></domain>")
    assert dom.metadata is None
    assert dom.memory_mib == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8080:80", (8080, 80)), ("1:65535", (1, 65535))],
)
def test_port_forward_parse(text: str, expected: tuple[int, int]) -> None:
    fwd = PortForward.parse(text)
    assert (fwd.host, fwd.guest) == expected


@pytest.mark.parametrize(
    "text", ["", "22", " 2022:22 ", "a:b", "1:2:3", "0:22", "70000:22", "80:", ":80", "٣:1"]
)
def test_port_forward_rejects(text: str) -> None:
    # One number is refused, as upstream does: HOST:GUEST both spelled out.
    with pytest.raises(UsageError, match="invalid port forward"):
        PortForward.parse(text)


@pytest.mark.parametrize(
    "path", ["/var/mnt/data", "/mnt/my data", "/srv/a-b_c.d", "/", "/.hidden/x", "/ü/ß"]
)
def test_escape_path_matches_systemd_escape(path: str) -> None:
    tool = shutil.which("systemd-escape")
    if tool is None:
        pytest.skip("systemd-escape not installed")
    expected = subprocess.run(
        [tool, "--path", path], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert mounts.escape_path(path) == expected


def test_mount_credentials_and_units(golden: Callable[[str, str], None]) -> None:
    shares = full_metadata().mounts
    creds = mounts.mount_credentials(shares)
    names = [n for n, _ in creds]
    assert names == [
        "systemd.extra-unit.var-src.mount",
        "systemd.extra-unit.mnt-data.mount",
        "systemd.unit-dropin.local-fs.target~bcvk-mounts",
    ]
    assert "Options=ro\n" in creds[1][1]
    assert "What=bcvk-bind-ro-0\n" in creds[1][1]
    assert creds[2][1] == "[Unit]\nWants=var-src.mount\nWants=mnt-data.mount\n"
    golden("libvirt-guest-mounts.sh", mounts.fstab_script(shares))


def test_guest_mount_script_is_valid_shell() -> None:
    script = mounts.fstab_script(
        [Share(ShareKind.bind_ro, "/h", "/mnt/it's here", "bcvk-bind-ro-0")]
    )
    subprocess.run(["sh", "-n", "-c", script], check=True)
    # the fstab entry escapes the blank, the shell quoting survives the quote
    assert "bcvk-bind-ro-0 /mnt/it'\"'\"'s\\040here virtiofs ro,nofail 0 0" in script


def test_filesystem_readonly_element_only_when_requested() -> None:
    fs = lx.Filesystem("/h", "t", readonly=True).to_element()
    assert fs.find("readonly") is not None
    plain = lx.Filesystem("/h", "t").to_element()
    assert plain.find("readonly") is None
    assert ET.tostring(plain).count(b"virtiofs") == 1


def test_secure_boot_with_the_users_keys_names_its_loader_and_variables(
    golden: Callable[[str, str], None],
) -> None:
    spec = full_spec(
        firmware=Firmware.uefi_secure,
        loader="/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
        nvram_template="/root/.cache/bcvk/secureboot/VARS-0123456789abcdef.fd",
    )
    domain = lx.build(spec)
    root = domain.to_element()
    os_el = root.find("os")
    assert os_el is not None
    assert os_el.get("firmware") is None  # the loader is named, not auto-selected
    loader = os_el.find("loader")
    assert loader is not None
    assert (loader.text, loader.get("secure"), loader.get("type")) == (
        "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd", "yes", "pflash",
    )  # fmt: skip
    nvram = os_el.find("nvram")
    assert nvram is not None
    assert nvram.get("template") == spec.nvram_template
    assert root.find("features/smm") is not None  # the secboot OVMF needs SMM
    again = lx.Domain.from_xml(domain.to_xml())
    assert (again.os.firmware, again.os.loader, again.os.nvram_template) == (
        Firmware.uefi_secure, spec.loader, spec.nvram_template,
    )  # fmt: skip
    golden("libvirt-domain-secure-boot-os.xml", ET.tostring(os_el, encoding="unicode") + "\n")
