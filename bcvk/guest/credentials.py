"""Getting an SSH key into a guest without touching the image.

Three routes, all pure text built here:

- SMBIOS type 11 strings carrying a systemd credential (``tmpfiles.extra``),
  which systemd ≥ 252 imports at boot on x86 and arm64 VMs;
- the same credential on the kernel command line, for guests that do not
  read SMBIOS: ``systemd.set_credential_binary=`` (base64, systemd ≥ 253) or
  the quoted one-line ``"systemd.set_credential=NAME:TEXT"`` that 252 knows;
- a cloud-init NoCloud seed (``user-data`` + ``meta-data``) for images that
  run cloud-init, which may ignore or override the credential route.
"""

from __future__ import annotations

import base64
import enum
import json
import re
from dataclasses import dataclass

TMPFILES_CREDENTIAL = "tmpfiles.extra"
SMBIOS_PREFIX = "io.systemd.credential.binary:"
CMDLINE_PREFIX = "systemd.set_credential_binary="
CMDLINE_TEXT_PREFIX = "systemd.set_credential="
# systemd imports SMBIOS type-11 credentials (and honours tmpfiles.extra)
# from 252 on; verified with Debian 12's 252.
SMBIOS_MIN_SYSTEMD = 252
# Debian 12's systemd 252 knows `systemd.set_credential=` but not the
# `_binary` form (its libsystemd-core has only the former's name).
CMDLINE_BINARY_MIN_SYSTEMD = 253

# Kernel command-line words are split at blanks and quotes: stricter names there.
_CMDLINE_NAME_RE = re.compile(r"[A-Za-z0-9_.@-]{1,255}")


class KeyRoute(enum.StrEnum):
    smbios = "smbios"
    cmdline = "cmdline"
    cloud_init = "cloud-init"


def b64(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data).decode("ascii")


def tmpfiles_authorized_key(public_key: str, user: str = "root", home: str = "/root") -> str:
    """tmpfiles.d lines that install PUBLIC_KEY for USER.

    ``f~`` creates the file from base64 content when it is missing; ``w+~``
    appends the key when the image already ships an authorized_keys (the
    key then appears twice in a fresh file, which sshd does not mind).
    """
    key = public_key.strip()
    if not key or "\n" in key:
        raise ValueError("an SSH public key is one non-empty line")
    encoded = b64(key + "\n")
    return (
        f"d {home}/.ssh 0700 {user} {user} -\n"
        f"f~ {home}/.ssh/authorized_keys 0600 {user} {user} - {encoded}\n"
        f"w+~ {home}/.ssh/authorized_keys - - - - {encoded}\n"
    )


def _check_name(name: str) -> str:
    """systemd's rule: a credential name is a valid file name.

    So ``systemd.unit-dropin.local-fs.target~bcvk-mounts`` and the ``\x2d``
    escapes of unit names are fine; a '/', NUL or control character is not.
    """
    if (
        not name
        or len(name.encode()) > 255
        or name in (".", "..")
        or any(c == "/" or ord(c) < 32 or ord(c) == 127 for c in name)
    ):
        raise ValueError(f"invalid credential name {name!r}")
    return name


def _check_cmdline_name(name: str) -> str:
    if not _CMDLINE_NAME_RE.fullmatch(name):
        raise ValueError(f"invalid credential name for the kernel command line {name!r}")
    return name


def smbios_value(name: str, data: bytes | str) -> str:
    """The value of ``-smbios type=11,value=…`` (or a libvirt ``<oemStrings>`` entry)
    carrying credential NAME."""
    return f"{SMBIOS_PREFIX}{_check_name(name)}={b64(data)}"


def cmdline_arg(name: str, data: bytes | str) -> str:
    """A kernel command-line word carrying credential NAME (base64, systemd ≥ 253)."""
    return f"{CMDLINE_PREFIX}{_check_cmdline_name(name)}:{b64(data)}"


def cmdline_text_arg(name: str, text: str) -> str:
    """Credential NAME as one double-quoted kernel argument (systemd ≥ 251).

    The kernel and systemd both honour the quotes, so TEXT may hold spaces,
    but it must be a single line without double quotes.
    """
    if "\n" in text.rstrip("\n") or '"' in text or any(ord(c) < 32 for c in text.rstrip("\n")):
        raise ValueError("a kernel command-line credential is one line without quotes")
    return f'"{CMDLINE_TEXT_PREFIX}{_check_cmdline_name(name)}:{text.rstrip(chr(10))}"'


def tmpfiles_authorized_key_line(public_key: str, user: str = "root", home: str = "/root") -> str:
    """One tmpfiles.d line installing the key (tmpfiles creates the parent dir)."""
    key = public_key.strip()
    if not key or "\n" in key:
        raise ValueError("an SSH public key is one non-empty line")
    return f"f~ {home}/.ssh/authorized_keys 0600 {user} {user} - {b64(key + chr(10))}"


def choose_routes(
    systemd_version: int | None, has_cloud_init: bool, arch: str = "x86_64"
) -> tuple[KeyRoute, ...]:
    """Which routes to use for a guest, most preferred first.

    Unknown systemd versions get both credential forms: a duplicate
    credential is ignored by systemd with a notice, never an error.
    """
    routes: list[KeyRoute] = []
    smbios_arch = arch in ("x86_64", "aarch64")
    if smbios_arch and (systemd_version is None or systemd_version >= SMBIOS_MIN_SYSTEMD):
        routes.append(KeyRoute.smbios)
    if systemd_version is None or systemd_version < SMBIOS_MIN_SYSTEMD or not smbios_arch:
        routes.append(KeyRoute.cmdline)
    if has_cloud_init:
        routes.append(KeyRoute.cloud_init)
    return tuple(routes)


def parse_routes(text: str) -> tuple[KeyRoute, ...]:
    """``smbios,cmdline`` → routes (``$BCVK_SSH_KEY_ROUTES``, to force a fallback)."""
    try:
        return tuple(KeyRoute(word.strip()) for word in text.split(",") if word.strip())
    except ValueError:
        raise ValueError(
            f"invalid SSH key routes {text!r}: use a comma list of smbios, cmdline, cloud-init"
        ) from None


@dataclass(frozen=True)
class KeyInjection:
    smbios: tuple[str, ...] = ()
    kernel_args: tuple[str, ...] = ()
    nocloud: tuple[tuple[str, str], ...] = ()  # (file name, content) for a cidata seed


def inject_key(
    public_key: str,
    routes: tuple[KeyRoute, ...],
    *,
    hostname: str,
    systemd_version: int | None = None,
) -> KeyInjection:
    tmpfiles = tmpfiles_authorized_key(public_key)
    smbios: tuple[str, ...] = ()
    kargs: tuple[str, ...] = ()
    seed: tuple[tuple[str, str], ...] = ()
    if KeyRoute.smbios in routes:
        smbios = (smbios_value(TMPFILES_CREDENTIAL, tmpfiles),)
    if KeyRoute.cmdline in routes:
        if systemd_version is None or systemd_version >= CMDLINE_BINARY_MIN_SYSTEMD:
            kargs += (cmdline_arg(TMPFILES_CREDENTIAL, tmpfiles),)
        if systemd_version is None or systemd_version < CMDLINE_BINARY_MIN_SYSTEMD:
            # A duplicate credential is ignored, so unknown versions get both.
            line = tmpfiles_authorized_key_line(public_key)
            kargs += (cmdline_text_arg(TMPFILES_CREDENTIAL, line),)
    if KeyRoute.cloud_init in routes:
        seed = (
            ("meta-data", nocloud_meta_data(hostname)),
            ("user-data", nocloud_user_data(public_key)),
        )
    return KeyInjection(smbios, kargs, seed)


def nocloud_meta_data(hostname: str, instance_id: str | None = None) -> str:
    # JSON is YAML; it needs no quoting rules of its own.
    return json.dumps(
        {"instance-id": instance_id or f"bcvk-{hostname}", "local-hostname": hostname}
    )


def nocloud_user_data(public_key: str) -> str:
    # Top-level keys go to the distribution's default user and, with
    # disable_root off, to root as well (without the "login as" prefix).
    body = {
        "disable_root": False,
        "ssh_authorized_keys": [public_key.strip()],
        "ssh_pwauth": False,
    }
    return "#cloud-config\n" + json.dumps(body, indent=2) + "\n"
