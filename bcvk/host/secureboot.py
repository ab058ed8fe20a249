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
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from bcvk import run
from bcvk.errors import NotFoundError, UsageError

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
