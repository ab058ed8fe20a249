"""`bcvk libvirt` as users run it, against a test:/// driver file (no daemon, no VM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bcvk.libvirt import xml as lx
from bcvk.values import PortForward
from tests.conftest import Cli, bcvk
from tests.unit.testdriver import domain_xml, node_file


def domain(name: str, md: lx.Metadata | None, running: bool) -> str:
    return domain_xml(name, None if md is None else md.to_element(), running)


@pytest.fixture
def uri(tmp_path: Path) -> str:
    doms = [
        domain(
            "web",
            lx.Metadata(
                source_image="localhost/web:1",
                ssh_port=2301,
                ssh_private_key_path="/keys/web/id_ed25519",
                memory_mb=2048,
                vcpus=2,
                labels=("ci", "web"),
                ports=(PortForward(8080, 80),),
            ),
            running=True,
        ),
        domain(
            "db",
            lx.Metadata(source_image="localhost/db:1", ssh_port=2302, labels=("ci",)),
            running=False,
        ),
        domain("foreign", None, running=True),
    ]
    return node_file(tmp_path, doms)


def test_list_table_json_and_filters(uri: str, cli: Cli) -> None:
    table = cli("libvirt", "-c", uri, "list", check=True).stdout.splitlines()
    assert table[0].split() == ["NAME", "IMAGE", "STATUS", "MEMORY", "CPUS", "SSH", "LABELS"]
    assert [line.split()[0] for line in table[1:]] == ["web"]  # running only, not foreign
    rows = json.loads(cli("libvirt", "-c", uri, "list", "--all", "--format", "json").stdout)
    assert [r["name"] for r in rows] == ["db", "web"]
    web = rows[1]
    assert web["ssh_port"] == 2301
    assert web["ssh_private_key_path"] == "/keys/web/id_ed25519"
    assert web["ssh_host"] == "127.0.0.1"
    assert web["labels"] == ["ci", "web"]
    assert web["ports"] == ["8080:80"]
    assert web["state"] == "running"
    assert web["disk_path"] == "/pool/web.qcow2"
    assert set(web) >= {"image", "image_digest", "memory_mb", "vcpus", "created", "ssh_user"}
    labelled = json.loads(
        cli("libvirt", "-c", uri, "list", "-a", "--label", "web", "--format", "json").stdout
    )
    assert [r["name"] for r in labelled] == ["web"]


@pytest.mark.parametrize("fmt", ["yaml", "json", "xml"])
def test_inspect_formats(uri: str, fmt: str, cli: Cli) -> None:
    out = cli("libvirt", "-c", uri, "inspect", "web", "--format", fmt, check=True).stdout
    if fmt == "xml":
        assert lx.Domain.from_xml(out).metadata is not None
        return
    data = json.loads(out) if fmt == "json" else yaml.safe_load(out)
    assert data["name"] == "web"
    assert data["metadata"]["ports"] == ["8080:80"]


@pytest.mark.parametrize(
    ("args", "message", "hint"),
    [
        (["inspect", "nope"], "no domain named 'nope'", "bcvk libvirt list --all"),
        (["rm", "-f", "foreign"], "was not created by bcvk", "use virsh"),
        (["rm", "web"], "VM web is running", "-f/--force"),
        (["ssh", "db", "--", "true"], "VM db is not running", "bcvk libvirt start db"),
        (["stop", "nope"], "no domain named 'nope'", None),
        (["start", "foreign"], "was not created by bcvk", None),
        # Off a terminal nothing is removed without -f (it used to be, silently).
        (["rm", "db"], "refusing without confirmation: Remove VM db", "pass -f"),
        (["rm-all"], "refusing without confirmation: Remove 2 VM(s)", "pass -f"),
        # Bad input is refused before libvirt is asked (an unreachable URI or not).
        (["rm", "-f", "--", "-rf"], "invalid VM name '-rf'", "letters, digits"),
        (["ssh", "ok\n", "--", "true"], "invalid VM name 'ok\\n'", "letters, digits"),
    ],
)
def test_errors_are_one_line_with_a_hint(
    uri: str, args: list[str], message: str, hint: str | None, cli: Cli
) -> None:
    result = cli("libvirt", "-c", uri, *args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: "), result.stderr
    assert message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    if hint:
        assert lines[-1].startswith("hint: ")
        assert hint in lines[-1]


def test_unreachable_daemon() -> None:
    result = bcvk("libvirt", "-c", "qemu+unix:///system?socket=/nonexistent/sock", "list")
    assert result.returncode == 1
    assert "cannot connect to libvirt" in result.stderr
    assert "libvirtd -d" in result.stderr


def test_bad_run_input_fails_before_touching_anything(uri: str, cli: Cli) -> None:
    for args, message in (
        (["-p", "x:1"], "invalid port forward"),
        (["--memory", "lots"], "invalid --memory"),
        (["--firmware", "uefi-secure"], "signed boot chain"),
        (["--label", "a,b"], "invalid label"),
        (["--itype", "u9.x"], "unknown instance type"),
    ):
        result = cli("libvirt", "-c", uri, "run", *args, "localhost/x:1")
        assert result.returncode != 0, args
        assert message in result.stderr, (args, result.stderr)


def test_status_and_help(uri: str, cli: Cli) -> None:
    data = json.loads(cli("libvirt", "-c", uri, "status", "--format", "json").stdout)
    assert data["domain_count"] == 2
    assert data["running_domain_count"] == 1
    assert "supports_readonly_virtiofs" in data
    help_text = cli("libvirt", "run", "--help").stdout
    for flag in ("--bind-ro", "--ro-bind", "--ssh-wait", "--disable-tpm", "--transient", "-R"):
        assert flag in help_text


@pytest.mark.parametrize(
    "args",
    [
        ["rm", "-f", "--", "-rf"],
        ["inspect", "a/b"],
        ["ssh", "x y", "--", "true"],
        ["ssh", "web", "--extra-options", "Bad Key=1", "--", "true"],
        ["ssh", "web", "--log-level", "LOUD", "--", "true"],
        ["ssh", "web", "--user", "-oProxyCommand=x", "--", "true"],
        ["start", "ok\n"],
        ["stop", ".."],
        ["run", "--name", "ok\n", "localhost/x:1"],
        ["run", "--label", "a\x01", "localhost/x:1"],
        # upstream's invalid ports (libvirt_port_forward.rs `invalid`)
        ["run", "-p", "8080", "localhost/x:1"],
        ["run", "--port", "abc:80", "localhost/x:1"],
        ["run", "--port", "8080:xyz", "localhost/x:1"],
        ["run", "--port", "70000:80", "localhost/x:1"],
        ["run", "--memory", "9" * 400, "localhost/x:1"],
        ["run", "--cpus", "0", "localhost/x:1"],
        ["upload", "localhost/x:1", "--volume-name", "x</name>"],
    ],
)
def test_bad_input_is_refused_before_connecting(args: list[str], cli: Cli) -> None:
    # No libvirtd answers at this URI: the input's own error must come first.
    dead = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
    result = cli("libvirt", "-c", dead, *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: invalid"), result.stderr
    assert "connect" not in result.stderr


def test_connect_is_also_taken_after_the_verb(uri: str, cli: Cli) -> None:
    before = cli("libvirt", "-c", uri, "list", "--all", check=True).stdout
    assert cli("libvirt", "list", "--all", "-c", uri, check=True).stdout == before
    assert cli("libvirt", "-c", uri, "list", "--connect", uri, "-a", check=True).stdout == before
    assert "db" in cli("libvirt", "inspect", "db", "-c", uri, check=True).stdout
    both = cli("libvirt", "-c", uri, "list", "-c", "qemu:///system")
    assert both.returncode == 2
    assert both.stderr.startswith("error: two libvirt URIs:")


def test_list_one_domain_and_the_key_fields(uri: str, cli: Cli, tmp_path: Path) -> None:
    table = cli("libvirt", "-c", uri, "list", "db", check=True).stdout.splitlines()
    assert [line.split()[:3] for line in table[1:]] == [["db", "localhost/db:1", "shut"]]
    rows = json.loads(cli("libvirt", "-c", uri, "list", "-a", "--format", "json").stdout)
    assert {r["name"]: r["has_ssh_key"] for r in rows} == {"db": False, "web": True}
    assert all("ssh_private_key" not in r for r in rows)  # never by default
    missing = cli("libvirt", "-c", uri, "list", "nope")
    assert missing.returncode == 1
    assert "no domain named 'nope'" in missing.stderr
    # On request, upstream's `ssh_private_key` (the PEM text) for consumers like tmt.
    key = tmp_path / "keys" / "id_ed25519"
    key.parent.mkdir()
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nx\n-----END OPENSSH PRIVATE KEY-----\n")
    md = lx.Metadata(source_image="localhost/k:1", ssh_port=2303, ssh_private_key_path=str(key))
    keyed = node_file(tmp_path, [domain("keyed", md, running=True)])
    (row,) = json.loads(
        cli("libvirt", "-c", keyed, "list", "--format", "json", "--include-private-key").stdout
    )
    assert row["ssh_private_key"] == key.read_text()
    assert row["has_ssh_key"] is True


def test_rm_stop_is_upstreams_spelling(uri: str, cli: Cli) -> None:
    # --stop gets past the running check; off a terminal -f is still what confirms.
    result = cli("libvirt", "-c", uri, "rm", "--stop", "web")
    assert result.returncode == 2
    assert "refusing without confirmation: Remove VM web" in result.stderr
    assert "--stop" in cli("libvirt", "rm-all", "--help").stdout


@pytest.mark.parametrize("network", ["user", "none", "bridge"])
def test_upstreams_network_values_parse(network: str, cli: Cli) -> None:
    # upstream's run_networking: `--network user|bridge|none --help` is accepted
    result = cli("libvirt", "run", "--network", network, "--help")
    assert result.returncode == 0
    assert "--network" in result.stdout


def test_print_firmware_reads_qemus_descriptors(tmp_path: Path, cli: Cli) -> None:
    from bcvk.host import firmware

    usr, etc = tmp_path / "usr", tmp_path / "etc"
    usr.mkdir()
    etc.mkdir()
    descriptor = {
        "description": "UEFI, secure boot, MS keys",
        "interface-types": ["uefi"],
        "mapping": {
            "device": "flash",
            "executable": {"filename": "/fw/CODE.ms.fd", "format": "raw"},
            "nvram-template": {"filename": "/fw/VARS.ms.fd", "format": "raw"},
        },
        "targets": [{"architecture": "x86_64", "machines": ["pc-q35-*"]}],
        "features": ["enrolled-keys", "requires-smm", "secure-boot"],
    }
    (usr / "40-sb.json").write_text(json.dumps(descriptor))
    (usr / "60-plain.json").write_text(json.dumps({**descriptor, "features": []}))
    (etc / "60-plain.json").write_text("[]")  # the admin's override: not a descriptor
    (usr / "10-broken.json").write_text("{")
    found = firmware.descriptors((usr, etc))
    assert [d.file for d in found] == [str(usr / "40-sb.json")]
    data = found[0].to_json()
    assert data["executable"] == "/fw/CODE.ms.fd"
    assert data["nvram_template"] == "/fw/VARS.ms.fd"
    assert (data["secure_boot"], data["enrolled_keys"]) == (True, True)
    # upstream's print_firmware: YAML has `architecture:`, JSON has "architecture"
    assert "architecture:" in cli("libvirt", "print-firmware", check=True).stdout
    shown = json.loads(cli("libvirt", "print-firmware", "--format", "json", check=True).stdout)
    assert shown["architecture"]
    assert isinstance(shown["descriptors"], list)
