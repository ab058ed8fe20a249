"""Secure Boot with the user's own keys: sbsign signs EFI binaries with the
db key; virt-fw-vars (virt-firmware) enrolls PK, KEK and db into a copy of
OVMF's variable store, so the VM boots with Secure Boot on and trusts only
what that db key signed.

The key directory holds PEM files as upstream bcvk's ``--secure-boot-keys``
expects (``PK.crt``, ``KEK.crt``, ``db.crt``, optionally ``GUID.txt``, the
owner GUID) plus ``db.key``, the private key bcvk signs with.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from bcvk import paths, run
from bcvk.errors import NotFoundError, UsageError
from bcvk.host import firmware

CERTIFICATES = ("PK.crt", "KEK.crt", "db.crt")
SIGNING_KEY = "db.key"
# Upstream reads the owner from GUID.txt; without one, this (bcvk's own) is used.
DEFAULT_OWNER = "1b6cb3c0-7d27-4b3e-9f5e-6263766b2e00"
_GUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
KEYGEN_HINT = (
    "make them with openssl, e.g. for K in PK KEK db: openssl req -newkey rsa:2048 -nodes "
    '-x509 -sha256 -days 3650 -subj "/CN=my $K/" -keyout $K.key -out $K.crt'
)


@dataclass(frozen=True)
class Keys:
    directory: Path
    owner: str

    @property
    def pk(self) -> Path:
        return self.directory / "PK.crt"

    @property
    def kek(self) -> Path:
        return self.directory / "KEK.crt"

    @property
    def db_cert(self) -> Path:
        return self.directory / "db.crt"

    @property
    def db_key(self) -> Path:
        return self.directory / SIGNING_KEY

    def fingerprint(self) -> str:
        """What a signed disk depends on: the db certificate (the key matches it)."""
        return "sha256:" + hashlib.sha256(self.db_cert.read_bytes()).hexdigest()


def load_keys(directory: str | os.PathLike[str]) -> Keys:
    """DIRECTORY's keys, each file checked to be PEM; the one parser of the flag."""
    path = Path(directory).absolute()
    if not path.is_dir():
        raise NotFoundError(f"--secure-boot-keys {path}: no such directory", hint=KEYGEN_HINT)
    for name in (*CERTIFICATES, SIGNING_KEY):
        try:
            head = (path / name).read_bytes()[:64]
        except OSError as exc:
            raise NotFoundError(
                f"--secure-boot-keys {path}: {name}: {exc.strerror}",
                hint=f"the directory needs {', '.join((*CERTIFICATES, SIGNING_KEY))}; "
                + KEYGEN_HINT,
            ) from exc
        if not head.startswith(b"-----BEGIN "):
            raise UsageError(
                f"--secure-boot-keys {path}: {name} is not a PEM file",
                hint="convert it: openssl x509 -in FILE.der -inform der -out FILE.crt",
            )
    owner = DEFAULT_OWNER
    guid_file = path / "GUID.txt"
    if guid_file.exists():
        owner = guid_file.read_text().strip()
        if not _GUID_RE.fullmatch(owner):
            raise UsageError(
                f"--secure-boot-keys {path}: GUID.txt is not a GUID: {owner[:40]!r}",
                hint="write one GUID, e.g. the output of `uuidgen`, or remove GUID.txt",
            )
    return Keys(path, owner)


def sign(keys: Keys, path: Path) -> None:
    """Sign the EFI binary at PATH with the db key, in place."""
    sbsign = run.require("sbsign", why="to sign EFI binaries for --secure-boot-keys")
    signed = path.with_name(path.name + ".signed")
    run.run(
        [sbsign, "--key", keys.db_key, "--cert", keys.db_cert, "--output", signed, path],
        hint="check that db.key is the private key of db.crt",
    )
    os.replace(signed, path)


def virt_fw_vars() -> Path:
    # A console script of the virt-firmware package, beside our interpreter.
    beside = Path(sys.executable).parent / "virt-fw-vars"
    return run.require("virt-fw-vars", beside, why="to enroll --secure-boot-keys into OVMF")


def enroll(keys: Keys, template: Path, output: Path) -> None:
    """OUTPUT: TEMPLATE (an empty OVMF variable store) with the keys enrolled
    and Secure Boot on."""
    owner = keys.owner
    run.run(
        [
            virt_fw_vars(), "--input", template, "--set-pk", owner, keys.pk,
            "--add-kek", owner, keys.kek, "--add-db", owner, keys.db_cert, "--sb",
            "--output", output,
        ],
        hint="check the certificates in the --secure-boot-keys directory",
    )  # fmt: skip


@dataclass(frozen=True)
class SecureFirmware:
    """OVMF with Secure Boot support and an empty variable store to enroll into."""

    code: Path
    vars_template: Path


def secure_firmware() -> SecureFirmware:
    """From QEMU's firmware descriptors: Secure Boot, no keys enrolled (bcvk
    enrolls the user's), this architecture, code and variables in flash files."""
    arch = platform.machine()
    for d in firmware.descriptors():
        if (
            "uefi" in d.interfaces and d.secure_boot and "enrolled-keys" not in d.features
            and arch in d.architectures and d.executable and d.nvram_template
        ):  # fmt: skip
            return SecureFirmware(Path(d.executable), Path(d.nvram_template))
    raise NotFoundError(
        "no Secure Boot OVMF without enrolled keys among QEMU's firmware descriptors",
        hint="install it: apt-get install ovmf (Debian/Ubuntu) or dnf install edk2-ovmf (Fedora); "
        "`bcvk libvirt print-firmware` lists what QEMU offers",
    )


def enrolled_template(keys: Keys, fw: SecureFirmware) -> Path:
    """OVMF variables with KEYS enrolled, made once per key set (a cache:
    libvirt copies it into each VM's own NVRAM file at the VM's first start)."""
    digest = hashlib.sha256(keys.owner.encode())
    for cert in (keys.pk, keys.kek, keys.db_cert, fw.vars_template):
        digest.update(os.fsencode(cert) + b"\0" + cert.read_bytes())
    directory = paths.ensure_private_dir(paths.cache_dir() / "secureboot")
    template = directory / f"VARS-{digest.hexdigest()[:16]}.fd"
    if not template.exists():
        partial = directory / f".{template.name}.{os.getpid()}"
        try:
            enroll(keys, fw.vars_template, partial)
            os.replace(partial, template)
        finally:
            partial.unlink(missing_ok=True)
    return template
