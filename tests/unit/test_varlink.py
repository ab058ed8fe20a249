"""`bcvk varlink serve`: upstream's interfaces over a real socket, bcvk's
commands behind them run against a fake podman."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bcvk import varlink
from tests.conftest import FakeBin, bcvk, bcvk_popen
from tests.unit.test_images import FAKE_PODMAN
from tests.varlink_client import Client

IMAGES = [
    {"Id": "a" * 64, "Names": ["localhost/b:1", "localhost/a:1"], "Size": 1, "Created": 0},
    {"Id": "b" * 64, "Names": None, "Size": 1, "Created": 0},  # dangling: no name
]


Served = tuple[Path, subprocess.Popen[str]]


@pytest.fixture
def served(
    fake_bin: FakeBin, isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Served]:
    fake_bin.add("podman", FAKE_PODMAN, python=True)
    monkeypatch.setenv("FAKE_IMAGES", json.dumps(IMAGES))
    path = tmp_path / "bcvk.sock"
    server = bcvk_popen("varlink", "serve", "--address", f"unix:{path}")
    yield path, server
    if server.poll() is None:
        server.kill()
    server.communicate()


def test_introspection_names_upstreams_interfaces(
    served: Served,
) -> None:
    with Client(served[0]) as client:
        info = client.call("org.varlink.service.GetInfo")["parameters"]
        assert info["interfaces"] == [
            "org.varlink.service", "io.bootc.vk.images", "io.bootc.vk.ephemeral",
            "io.bootc.vk.todisk",
        ]  # fmt: skip
        for name in varlink.INTERFACES:
            reply = client.call("org.varlink.service.GetInterfaceDescription", interface=name)
            text = (varlink.INTERFACE_DIR / f"{name}.varlink").read_text()
            assert reply["parameters"]["description"] == text
        description = client.call(
            "org.varlink.service.GetInterfaceDescription", interface="io.bootc.vk.ephemeral"
        )["parameters"]["description"]
        for method in ("method Ps()", "method Run(", "method GetSshConnectionInfo("):
            assert method in description


def test_calls_and_their_errors(served: Served) -> None:
    with Client(served[0]) as client:
        listed = client.call("io.bootc.vk.images.List")
        assert listed == {"parameters": {"images": ["localhost/a:1", "localhost/b:1"]}}
        assert client.call("io.bootc.vk.ephemeral.Ps") == {"parameters": {"container_ids": []}}
        bad_format = client.call(
            "io.bootc.vk.todisk.ToDisk", source_image="localhost/a:1", target_disk="/x.img",
            format="iso",
        )  # fmt: skip
        assert bad_format["error"] == "io.bootc.vk.todisk.Failed"
        assert bad_format["parameters"]["message"].startswith("unsupported disk format: 'iso'")
        relative = client.call("io.bootc.vk.todisk.ToDisk", source_image="localhost/a:1",
                               target_disk="disk.raw")  # fmt: skip
        assert relative["parameters"]["message"] == (
            "target_disk must be an absolute path, not 'disk.raw'"
        )
        missing = client.call("io.bootc.vk.ephemeral.Run", image="localhost/none:1")
        assert missing["error"] == "io.bootc.vk.ephemeral.PodmanError"
        assert "localhost/none:1" in missing["parameters"]["message"]
        refused = client.call("io.bootc.vk.ephemeral.Run", image="localhost/a:1",
                              opts={"env": ["A=1"]})  # fmt: skip
        assert refused["parameters"]["message"].startswith("opts.env: there is no container")
        unknown = client.call("io.bootc.vk.ephemeral.GetSshConnectionInfo", container_id="nope")
        assert unknown["parameters"]["message"] == "no ephemeral VM named 'nope'"
        assert client.call("io.bootc.vk.images.Nope")["error"] == (
            "org.varlink.service.MethodNotFound"
        )
        assert client.call("io.bootc.vk.images.List", extra=1)["error"] == (
            "org.varlink.service.InvalidParameter"
        )


def test_stopping_the_server_removes_its_socket_and_exits_0(
    served: Served,
) -> None:
    path, server = served
    Client(path).close()  # it is listening
    assert path.stat().st_mode & 0o777 == 0o600  # only its user may call it
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=10) == 0
    assert not path.exists()


def test_bad_addresses_are_refused_and_nothing_is_removed(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("user data\n")
    result = bcvk("varlink", "serve", "--address", f"unix:{taken}")
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: cannot listen on {taken}: Address already in use")
    assert taken.read_text() == "user data\n"
    for address in ("tcp:127.0.0.1:1", "unix:", str(tmp_path / "x")):
        result = bcvk("varlink", "serve", "--address", address)
        assert result.returncode == 2
        assert result.stderr.startswith("error: invalid varlink address")
    no_socket = bcvk("varlink", "serve")
    assert no_socket.returncode == 2
    assert "no socket to serve" in no_socket.stderr


def test_run_options_become_bcvk_ephemeral_run_flags() -> None:
    argv = varlink.run_argv(
        "localhost/a:1",
        {"name": "v1", "memory": "2G", "vcpus": 2, "kargs": ["a=1", "b"], "bind": ["/src:src"],
         "ssh_keygen": True, "rm": True, "env": None, "console": False},
    )  # fmt: skip
    assert argv == [
        "ephemeral", "run", "-d", "--name=v1", "--memory=2G", "--vcpus=2",
        "--karg=a=1", "--karg=b", "--bind=/src:src", "--", "localhost/a:1",
    ]  # fmt: skip
    with pytest.raises(varlink.CallFailed, match="opts.network"):
        varlink.run_argv("localhost/a:1", {"network": "host"})
    # A caller's value is never read as another option, and a string is not a list.
    assert varlink.run_argv("i", {"name": "--help"})[3] == "--name=--help"
    with pytest.raises(varlink.CallFailed, match="opts.kargs: expected a list of strings"):
        varlink.run_argv("i", {"kargs": "quiet"})
