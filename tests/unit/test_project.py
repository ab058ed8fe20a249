"""`bcvk.toml` and `bcvk up | down | status | config show`, against libvirt's test driver."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bcvk import project
from bcvk.errors import BcvkError, UsageError
from bcvk.libvirt import xml as lx
from bcvk.libvirt.connection import Connection
from bcvk.project import spec
from bcvk.to_disk import Filesystem
from bcvk.values import Firmware, validate_vm_name
from tests import schemas
from tests.conftest import ROOT, Cli
from tests.unit.testdriver import URI, domain_xml, shared_connection

IMAGE = "localhost/bcvk/debian-bootc:12"
FILE = f"""\
# two VMs of one image
[defaults]
image = "{IMAGE}"
memory = "1G"
connect = "{URI}"

[vm.web]
port = "18080:80"
bind-ro = ["./site:/srv/www"]

[vm.db]
memory = 1536
disk-size = "12G"
label = ["db", "ci"]
"""


@pytest.fixture
def conn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Connection]:
    yield from shared_connection(tmp_path, monkeypatch)


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str], Path]:
    (tmp_path / "site").mkdir()

    def write(text: str) -> Path:
        path = tmp_path / "bcvk.toml"
        path.write_text(text)
        return path

    return write


def made_by_up(conn: Connection, proj: project.Project, name: str, *, running: bool,
               settings: dict[str, str] | None = None) -> None:  # fmt: skip
    """Define the domain `bcvk up` would have made for NAME (with SETTINGS, if given)."""
    (vm,) = proj.select((name,))
    applied = json.dumps(settings if settings is not None else vm.settings(), sort_keys=True)
    md = lx.Metadata(
        source_image=IMAGE, ssh_port=2300, domain_name=name,
        project=lx.Project(str(proj.path), name, applied),
    )  # fmt: skip
    define(conn, name, md.to_element(), running)


def populate(conn: Connection, path: Path, made: dict[str, bool], *, hand: str,
             hand_running: bool = False) -> project.Project:  # fmt: skip
    """PATH's project with the VMs MADE (name → running) as `up` makes them,
    and a domain HAND of the same name as one of the file's, made by hand."""
    proj = project.load(path)
    for name, running in made.items():
        made_by_up(conn, proj, name, running=running)
    define(conn, hand, None, running=hand_running)
    return proj


def define(conn: Connection, name: str, metadata: object, running: bool) -> None:
    import xml.etree.ElementTree as ET

    assert metadata is None or isinstance(metadata, ET.Element)
    dom = conn.define(domain_xml(name, metadata, running=False))
    if running:
        dom.start()


# ------------------------------------------------------------------ the file


def test_defaults_apply_and_values_are_typed(write: Callable[[str], Path]) -> None:
    proj = project.load(write(FILE))
    web, db = proj.vms
    assert (web.name, web.kind, db.kind) == ("web", project.Kind.libvirt, project.Kind.libvirt)
    assert web.uri == URI
    lweb, ldb = web.libvirt_options, db.libvirt_options
    assert lweb is not None
    assert ldb is not None
    assert lweb.memory == 1 << 30  # from [defaults]
    assert ldb.memory == 1536 << 20  # an integer is MiB, as --memory 1536
    assert ldb.disk_size == 12 << 30
    assert ldb.labels == ("db", "ci")
    assert [str(p) for p in lweb.ports] == ["18080:80"]  # one string is a list of one
    # Host paths are relative to the file, wherever bcvk runs.
    assert [(s.source, s.target, s.readonly) for s in lweb.shares] == [
        (str(proj.path.parent / "site"), "/srv/www", True)
    ]
    assert lweb.firmware is Firmware.uefi
    assert (web.settings()["memory"], db.settings()["memory"]) == ("1.0 GiB", "1.5 GiB")
    assert web.settings()["image"] == IMAGE


def test_equal_sizes_are_the_same_setting(write: Callable[[str], Path]) -> None:
    a = project.load(write(FILE.replace('memory = "1G"', 'memory = "1024M"'))).vms[0]
    b = project.load(write(FILE)).vms[0]
    assert a.settings() == b.settings()


def test_ephemeral_vms_take_ephemeral_options(write: Callable[[str], Path]) -> None:
    proj = project.load(write(
        f'[vm.scratch]\nkind = "ephemeral"\nimage = "{IMAGE}"\nmemory = "1G"\nvcpus = 1\n'
        'bind = ["./site"]\n'
    ))  # fmt: skip
    (vm,) = proj.vms
    opts = vm.ephemeral_options
    assert opts is not None
    assert vm.libvirt_options is None
    assert (opts.name, opts.memory_mib, opts.vcpus, opts.detach) == ("scratch", 1024, 1, True)
    assert [(b.source, b.readonly) for b in opts.binds] == [(str(proj.path.parent / "site"), False)]


def test_config_show_round_trips(write: Callable[[str], Path], golden: Callable[[str, str], None],
                                 cli: Cli) -> None:  # fmt: skip
    path = write(FILE)
    shown = cli("config", "show", "-f", str(path), check=True).stdout
    golden("project/config-show.toml", shown.replace(str(path.parent), "/PROJECT"))
    # What `config show` prints is a file `up` reads as the same project.
    again = write(shown)
    assert project.effective(project.load(again)) == project.effective(project.load(path))
    data = json.loads(cli("config", "show", "-f", str(path), "--format", "json").stdout)
    assert data["vm"]["web"]["kind"] == "libvirt"
    assert data["vm"]["web"]["port"] == ["18080:80"]
    assert data["vm"]["db"]["memory"] == 1536


@pytest.mark.parametrize(
    ("text", "error", "hint"),
    [
        (FILE.replace('memory = "1G"', 'memory = "lots"'),
         "bcvk.toml:4: defaults.memory: invalid memory 'lots'", "e.g. 512M"),
        (FILE.replace("memory = 1536", 'memroy = "2G"'),
         "bcvk.toml:12: vm.db.memroy: unknown key 'memroy'", "did you mean 'memory'?"),
        (FILE.replace('port = "18080:80"', 'port = "8080"'),
         "bcvk.toml:8: vm.web.port: invalid port forward '8080'", "give both ports"),
        (FILE.replace("memory = 1536", 'vcpus = "two"'),
         "bcvk.toml:12: vm.db.vcpus: unexpected string", "vcpus = 2"),
        (FILE.replace("memory = 1536", "vcpus = 0"), "bcvk.toml:12: vm.db.vcpus: invalid vcpus 0",
         None),
        (FILE.replace('disk-size = "12G"', 'disk-size = "12Q"'),
         "bcvk.toml:13: vm.db.disk-size: invalid disk-size '12Q'", None),
        (FILE.replace('["db", "ci"]', '["a,b"]'), "bcvk.toml:14: vm.db.label: invalid label", None),
        (FILE.replace("./site", "./nowhere"), "bcvk.toml:9: vm.web.bind-ro: bind-ro ", None),
        (FILE + 'filesystem = "zfs"\n', "bcvk.toml:15: vm.db.filesystem: invalid filesystem",
         "ext4, xfs, btrfs"),
        (FILE + 'kind = "docker"\n', "bcvk.toml:15: vm.db.kind: invalid kind 'docker'",
         '"ephemeral"'),
        (FILE + 'kind = "ephemeral"\n', "bcvk.toml:5: defaults.connect: not an option of "
         "ephemeral VMs", 'kind = "libvirt"'),
        (FILE + "\n[vm.cache]\nimage = 3\n", "bcvk.toml:17: vm.cache.image: unexpected integer",
         'image = "'),
        (FILE.replace("[vm.db]", "[vm.db]]"), "bcvk.toml:11: invalid TOML", "toml.io"),
        (FILE.replace("[vm.db]", '[vm."d b"]'), "bcvk.toml:11: vm.d b: invalid VM name", None),
        (FILE.replace("[vm.db]", "[vms.db]"), "bcvk.toml:11: vms: unknown table 'vms'",
         "did you mean 'vm'?"),
        (FILE.replace(f'image = "{IMAGE}"', 'image = "Bad Ref"'),
         "bcvk.toml:3: defaults.image: invalid image reference", None),
        (FILE.replace(f'image = "{IMAGE}"\n', ""), "bcvk.toml:6: vm.web: no image",
         "[defaults]"),
        ('[defaults]\nmemory = "1G"\n', "bcvk.toml: no VMs", "[vm.NAME]"),
    ],
)  # fmt: skip
def test_errors_name_the_line_and_key(write: Callable[[str], Path], conn: Connection, cli: Cli,
                                      text: str, error: str, hint: str | None) -> None:  # fmt: skip
    path = write(text)
    before = {d.name for d in conn.domains()}
    result = cli("up", "-f", str(path))
    assert result.returncode == 2, result.stderr
    first, *rest = result.stderr.splitlines()
    assert first.startswith(f"error: {error}"), result.stderr
    assert len(rest) == 1, result.stderr
    assert rest[0].startswith("hint: "), result.stderr
    if hint:
        assert hint in rest[0]
    assert {d.name for d in conn.domains()} == before  # nothing created


def test_a_missing_file_is_one_line(tmp_path: Path, cli: Cli,
                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    for args in (["status"], ["up"], ["down"], ["config", "show"]):
        result = cli(*args)
        assert result.returncode == 1
        assert result.stderr.startswith(f"error: no bcvk.toml in {tmp_path}\nhint: ")
    result = cli("status", "-f", "nope.toml")
    assert result.stderr.startswith("error: nope.toml: no such file")


def test_unknown_vm_names_are_refused(write: Callable[[str], Path], cli: Cli) -> None:
    result = cli("status", "-f", str(write(FILE)), "wbe")
    assert result.returncode == 2
    assert "bcvk.toml has no VM named 'wbe'" in result.stderr
    assert "did you mean 'web'?" in result.stderr


def test_the_schema_describes_what_the_parser_takes() -> None:
    schema = json.loads((ROOT / "docs/schema/bcvk.toml.schema.json").read_text())
    assert set(schema["properties"]) == {"defaults", "vm"}
    props = schema["$defs"]["vm"]["properties"]
    assert list(props) == list(spec.KEYS)
    names = {str: "string", int: "integer", list: "array"}
    for key, (types, _, _) in spec.KEYS.items():
        prop = props[key]
        if "enum" in prop:
            assert types == (str,)
            continue
        declared = [p["type"] for p in prop.get("anyOf", [prop])]
        assert declared == [names[t] for t in types], key
        assert ("libvirt only" in prop["description"]) == spec.KEYS[key][2], key
    assert props["kind"]["enum"] == [k.value for k in project.Kind]
    assert props["filesystem"]["enum"] == [f.value for f in Filesystem]
    assert props["firmware"]["enum"] == [f.value for f in Firmware]
    pattern = schema["properties"]["vm"]["propertyNames"]["pattern"]
    for name in ("web", "a.b-c_1", "-x", "x" * 64, "a b"):
        valid = re.fullmatch(pattern.strip("^$"), name) is not None
        try:
            validate_vm_name(name)
            parsed = True
        except UsageError:
            parsed = False
        assert valid == parsed, name


# ------------------------------------------------------------------ the state


def test_differences_say_what_changed() -> None:
    recorded = {"kind": "libvirt", "image": IMAGE, "memory": "2 GiB", "port": "8080:80"}
    wanted = {"kind": "libvirt", "image": IMAGE, "memory": "4 GiB", "vcpus": "2"}
    assert project.differences(recorded, wanted) == (
        "memory 2 GiB → 4 GiB", "vcpus (default) → 2", "port 8080:80 → (default)",
    )  # fmt: skip
    assert project.differences(wanted, dict(wanted)) == ()


def test_status_in_sync_differs_missing_and_foreign(
    write: Callable[[str], Path], conn: Connection, cli: Cli, tmp_path: Path
) -> None:
    path = write(FILE + '\n[vm.cache]\nimage = "localhost/x:1"\n\n[vm.hand]\nimage = "x:1"\n')
    proj = project.load(path)
    made_by_up(conn, proj, "web", running=True)
    old = {**proj.select(("db",))[0].settings(), "memory": "2.0 GiB"}
    made_by_up(conn, proj, "db", running=False, settings=old)
    define(conn, "hand", None, running=True)  # made by hand, same name
    rows = json.loads(cli("status", "-f", str(path), "--format", "json", check=True).stdout)
    schemas.check("project-status", rows)
    by_name = {r["name"]: r for r in rows}
    assert [r["name"] for r in rows] == ["web", "db", "cache", "hand"]
    assert (by_name["web"]["sync"], by_name["web"]["state"]) == ("in sync", "running")
    assert by_name["web"]["ssh_port"] == 2300
    assert by_name["db"]["sync"] == "differs"
    assert by_name["db"]["differences"] == ["memory 2.0 GiB → 1.5 GiB"]
    assert by_name["cache"]["sync"] == "missing"
    assert by_name["hand"]["sync"] == "foreign"
    table = cli("status", "-f", str(path), check=True).stdout.splitlines()
    assert table[0].split() == ["NAME", "KIND", "STATE", "SSH", "FILE"]
    assert "differs: memory 2.0 GiB → 1.5 GiB" in table[2]
    # The same VM name in another project's file is not this file's VM.
    other = tmp_path / "other" / "bcvk.toml"
    other.parent.mkdir()
    other.write_text(FILE.replace("./site", str(tmp_path / "site")))
    rows = json.loads(cli("status", "-f", str(other), "--format", "json").stdout)
    assert rows[0]["sync"] == "foreign"


def test_up_refuses_before_touching_anything(
    write: Callable[[str], Path], conn: Connection, cli: Cli
) -> None:
    path = write(FILE + '\n[vm.new]\nimage = "localhost/x:1"\n')
    proj = populate(conn, path, {"web": False}, hand="db")
    result = cli("up", "-f", str(path))
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"error: vm.db: a domain named 'db' exists that was not created from {path}\n"
    )
    assert "never adopts or removes" in result.stderr
    assert not conn.get("web").is_active()  # not started: `up` refused as a whole
    assert conn.lookup("new") is None
    # A VM whose settings changed is refused without --recreate, and says how.
    conn.get("db").undefine()
    old = {**proj.select(("db",))[0].settings(), "memory": "2.0 GiB"}
    made_by_up(conn, proj, "db", running=False, settings=old)
    result = cli("up", "-f", str(path), "db")
    assert result.returncode == 1
    assert "vm.db differs from the file: memory 2.0 GiB → 1.5 GiB" in result.stderr
    assert "bcvk up --recreate db" in result.stderr


def test_up_starts_a_stopped_vm_and_leaves_a_running_one(
    write: Callable[[str], Path], conn: Connection, cli: Cli
) -> None:
    proj = project.load(write(FILE))
    made_by_up(conn, proj, "web", running=False)
    made_by_up(conn, proj, "db", running=True)
    result = cli("up", "-f", str(proj.path), check=True)
    assert result.stdout.splitlines() == ["web: started", "db: unchanged"]
    assert conn.get("web").is_active()


def test_down_touches_only_the_files_vms(
    write: Callable[[str], Path], conn: Connection, cli: Cli
) -> None:
    path = write(FILE + '\n[vm.hand]\nimage = "x:1"\n\n[vm.gone]\nimage = "x:1"\n')
    populate(conn, path, {"web": True, "db": False}, hand="hand", hand_running=True)
    result = cli("down", "-f", str(path), check=True)
    assert result.stdout.splitlines() == [
        "web: stopped", "db: already stopped", "hand: left alone", "gone: missing",
    ]  # fmt: skip
    assert "left hand alone: it was not created from" in result.stderr
    assert not conn.get("web").is_active()
    assert conn.get("hand").is_active()
    result = cli("down", "-f", str(path), "--rm", check=True)
    assert result.stdout.splitlines()[:3] == ["web: removed", "db: removed", "hand: left alone"]
    assert conn.lookup("web") is None
    assert conn.lookup("db") is None
    assert conn.lookup("hand") is not None


def test_ssh_needs_a_vm_that_is_up(
    write: Callable[[str], Path], conn: Connection, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(FILE)
    monkeypatch.chdir(path.parent)
    result = cli("ssh", "web", "--", "true")
    assert result.returncode == 2
    assert result.stderr.startswith("error: VM web of bcvk.toml is not up\n")
    assert "bcvk up web" in result.stderr
    # A name the file does not have is an ephemeral VM's, as before.
    result = cli("ssh", "nobody")
    assert result.returncode == 1
    assert "no ephemeral VM named 'nobody'" in result.stderr


def test_ssh_wait_waits_side_by_side_and_names_every_vm_that_fails(
    write: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import threading
    import time

    from bcvk import libvirt

    proj = project.load(write(FILE))
    inside = threading.Barrier(2, timeout=5)  # both waits must be in flight at once

    def ssh_command(name: str, argv: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        inside.wait()
        time.sleep(0.05)
        return subprocess.CompletedProcess(argv, 255, "", f"{name}: connection refused")

    monkeypatch.setattr(libvirt, "ssh_command", ssh_command)
    with pytest.raises(BcvkError) as caught:
        project.wait_for_ssh(proj.vms, timeout=1)
    assert "VM web did not answer SSH: web: connection refused" in caught.value.message
    assert "VM db did not answer SSH: db: connection refused" in caught.value.message
