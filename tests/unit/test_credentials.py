"""SSH key injection: credential encodings and route choice (pure)."""

from __future__ import annotations

import base64
import json

import pytest

from bcvk.guest import credentials
from bcvk.guest.credentials import KeyRoute

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq0l8Yk9w0g3cOjQ6m7m2xq1n0K5yJrWmX5w8m0z1Qp bcvk-demo"


def decode_tmpfiles(value: str) -> list[list[str]]:
    prefix = "io.systemd.credential.binary:tmpfiles.extra="
    assert value.startswith(prefix)
    text = base64.b64decode(value[len(prefix) :], validate=True).decode()
    assert text.endswith("\n")
    return [line.split() for line in text.splitlines()]


def test_smbios_credential_installs_the_key_for_root() -> None:
    value = credentials.smbios_value("tmpfiles.extra", credentials.tmpfiles_authorized_key(KEY))
    lines = decode_tmpfiles(value)
    assert lines[0] == ["d", "/root/.ssh", "0700", "root", "root", "-"]
    create, append = lines[1], lines[2]
    assert create[:6] == ["f~", "/root/.ssh/authorized_keys", "0600", "root", "root", "-"]
    assert append[:2] == ["w+~", "/root/.ssh/authorized_keys"]
    for line in (create, append):
        assert base64.b64decode(line[-1]).decode() == KEY + "\n"
    # QEMU's -smbios parser splits on commas; base64 has none.
    assert "," not in value


def test_kernel_command_line_text_form_for_systemd_252() -> None:
    inj = credentials.inject_key(KEY, (KeyRoute.cmdline,), hostname="h", systemd_version=252)
    (arg,) = inj.kernel_args
    assert arg.startswith('"systemd.set_credential=tmpfiles.extra:f~ /root/.ssh/authorized_keys ')
    assert arg.endswith('"')
    assert arg.count('"') == 2
    assert "\n" not in arg
    encoded = arg.rstrip('"').rsplit(" ", 1)[1]
    assert base64.b64decode(encoded).decode() == KEY + "\n"
    newer = credentials.inject_key(KEY, (KeyRoute.cmdline,), hostname="h", systemd_version=256)
    assert [a.split("=", 1)[0] for a in newer.kernel_args] == ["systemd.set_credential_binary"]
    unknown = credentials.inject_key(KEY, (KeyRoute.cmdline,), hostname="h")
    assert len(unknown.kernel_args) == 2
    with pytest.raises(ValueError, match="one line"):
        credentials.cmdline_text_arg("x", 'a "quoted" word')


def test_kernel_command_line_form_is_one_word() -> None:
    arg = credentials.cmdline_arg("tmpfiles.extra", credentials.tmpfiles_authorized_key(KEY))
    assert arg.startswith("systemd.set_credential_binary=tmpfiles.extra:")
    assert " " not in arg
    assert "\n" not in arg
    payload = arg.split(":", 1)[1]
    assert "f~ /root/.ssh/authorized_keys" in base64.b64decode(payload).decode()


@pytest.mark.parametrize("bad", ["", "two\nlines"])
def test_bad_keys_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="one non-empty line"):
        credentials.tmpfiles_authorized_key(bad)


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "nul\0", "new\nline", "x" * 256])
def test_bad_credential_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="credential name"):
        credentials.smbios_value(bad, "x")


def test_credential_names_are_systemds_file_names() -> None:
    # The names systemd's own unit credentials use must pass (one encoder for all).
    for name in ("systemd.unit-dropin.local-fs.target~bcvk-mounts", "systemd.extra-unit.a\\x2db"):
        assert credentials.smbios_value(name, "x").startswith(credentials.SMBIOS_PREFIX + name)
    with pytest.raises(ValueError, match="kernel command line"):
        credentials.cmdline_arg("a b", "x")


@pytest.mark.parametrize(
    ("version", "cloud_init", "arch", "expected"),
    [
        (252, False, "x86_64", (KeyRoute.smbios,)),
        (256, True, "x86_64", (KeyRoute.smbios, KeyRoute.cloud_init)),
        (250, False, "x86_64", (KeyRoute.cmdline,)),
        (None, False, "x86_64", (KeyRoute.smbios, KeyRoute.cmdline)),
        (255, False, "s390x", (KeyRoute.cmdline,)),
    ],
)
def test_routes(
    version: int | None, cloud_init: bool, arch: str, expected: tuple[KeyRoute, ...]
) -> None:
    assert credentials.choose_routes(version, cloud_init, arch) == expected


def test_injection_for_every_route() -> None:
    routes = (KeyRoute.smbios, KeyRoute.cmdline, KeyRoute.cloud_init)
    inj = credentials.inject_key(KEY, routes, hostname="vm1")
    assert len(inj.smbios) == 1
    assert len(inj.kernel_args) == 2  # version unknown: both command-line forms
    files = dict(inj.nocloud)
    assert json.loads(files["meta-data"]) == {"instance-id": "bcvk-vm1", "local-hostname": "vm1"}
    user_data = files["user-data"]
    assert user_data.startswith("#cloud-config\n")
    body = json.loads(user_data.split("\n", 1)[1])
    assert body["ssh_authorized_keys"] == [KEY]
    assert body["disable_root"] is False


def test_injection_defaults_to_nothing_extra() -> None:
    inj = credentials.inject_key(KEY, (KeyRoute.smbios,), hostname="vm1")
    assert inj.kernel_args == ()
    assert inj.nocloud == ()


def test_routes_can_be_forced() -> None:
    assert credentials.parse_routes("cmdline") == (KeyRoute.cmdline,)
    assert credentials.parse_routes(" smbios , cloud-init") == (
        KeyRoute.smbios,
        KeyRoute.cloud_init,
    )
    with pytest.raises(ValueError, match="invalid SSH key routes"):
        credentials.parse_routes("smbios,fw_cfg")
