"""NoCloud seed ISOs from a user's cloud-init directory (``bcvk pb run --cloudinit DIR``).

cloud-init's NoCloud datasource finds its seed on any filesystem labelled
``cidata`` holding ``user-data`` and ``meta-data`` (and optionally
``network-config`` / ``vendor-data``).  podman-bootc packs the directory
with ``xorrisofs -volid cidata -joliet -rock``; bcvk does the same with
``xorriso -as mkisofs``.  A missing ``meta-data`` is generated (cloud-init
refuses a seed without one) so that a directory with only ``user-data``
works, as users expect.

``credentials.py`` writes bcvk's own key-injection user-data; this module
packs it (``vfat_seed``) or a directory the user wrote (``build_seed``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bcvk import paths, run
from bcvk.errors import NotFoundError, UsageError, os_hint
from bcvk.log import logger
from bcvk.values import MIB

VOLUME_ID = "cidata"
SEED_FILES = ("user-data", "meta-data", "network-config", "vendor-data")


def check_dir(directory: Path) -> Path:
    """DIRECTORY resolved, or a clear error when it is not a usable seed directory."""
    path = paths.user_path(str(directory), "--cloudinit")
    if not path.is_dir():
        raise NotFoundError(
            f"--cloudinit {directory}: no such directory",
            hint="pass a directory that holds a user-data file (and optionally meta-data)",
        )
    if not (path / "user-data").is_file():
        raise UsageError(
            f"--cloudinit {directory} has no user-data file",
            hint="cloud-init's NoCloud seed needs DIR/user-data (e.g. a #cloud-config file)",
        )
    return path.resolve()


EMPTY_USER_DATA = "#cloud-config\n"


def read_seed(text: str, flag: str = "--cloud-init") -> tuple[tuple[str, str], ...]:
    """A NoCloud directory (with user-data) or a user-data file, as (name, content) pairs."""
    path = paths.user_path(text, flag)
    hint = "give a NoCloud directory holding user-data, or a user-data file"
    try:
        if path.is_dir():
            if not (path / "user-data").is_file():
                raise UsageError(f"{flag} {text}: the directory has no user-data file", hint=hint)
            names = [n for n in SEED_FILES if (path / n).is_file()]
            return tuple((n, (path / n).read_text()) for n in names)
        if path.is_file():
            return (("user-data", path.read_text()),)
    except UnicodeDecodeError:
        raise UsageError(f"{flag} {text}: not a text file", hint=hint) from None
    except OSError as exc:
        raise UsageError(f"{flag} {text}: {exc.strerror}", hint=os_hint(exc)) from None
    raise UsageError(f"{flag} {text}: no such file or directory", hint=hint)


def meta_data(instance_id: str, hostname: str) -> str:
    """A minimal NoCloud meta-data document (pure)."""
    return f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n"


def xorriso_argv(xorriso: str | os.PathLike[str], source: Path, output: Path) -> list[str]:
    """The command that packs SOURCE into an ISO labelled cidata (pure)."""
    return [
        os.fspath(xorriso), "-as", "mkisofs", "-quiet",
        "-output", os.fspath(output),
        "-volid", VOLUME_ID, "-joliet", "-rock",
        os.fspath(source),
    ]  # fmt: skip


def build_seed(directory: Path, output: Path, *, instance_id: str, hostname: str) -> Path:
    """Write a NoCloud seed ISO of DIRECTORY to OUTPUT (atomically) and return OUTPUT."""
    source = check_dir(directory)
    xorriso = run.require("xorriso", why="to build the cloud-init seed ISO")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bcvk-cidata-") as tmp:
        staging = Path(tmp) / "seed"
        staging.mkdir()
        # Only the files cloud-init reads; anything else in DIR stays out.
        for name in SEED_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, staging / name)
        if not (staging / "meta-data").exists():
            (staging / "meta-data").write_text(meta_data(instance_id, hostname))
        partial = output.with_name(output.name + ".partial")
        partial.unlink(missing_ok=True)
        run.run(xorriso_argv(xorriso, staging, partial))
        # user-data often holds passwords or tokens: for the user (libvirt relabels).
        partial.chmod(0o600)
        partial.replace(output)
    return output


def vfat_seed(files: Sequence[tuple[str, str]], output: Path) -> bool:
    """FILES ((name, content) pairs) as a 2 MiB FAT seed labelled cidata, without root.

    For bcvk's own key-injection seed on ephemeral VMs; False (with a warning)
    when dosfstools or mtools are missing, as the seed is only a fallback.
    """
    mkfs = run.find_binary("mkfs.vfat", *run.sbin("mkfs.vfat"))
    mcopy = run.find_binary("mcopy")
    if mkfs is None or mcopy is None:
        logger.warning("cloud-init seed skipped: mkfs.vfat or mcopy missing (dosfstools, mtools)")
        return False
    with output.open("wb") as f:
        f.truncate(2 * MIB)
    run.run([mkfs, "-n", VOLUME_ID.upper(), output])
    with tempfile.TemporaryDirectory(prefix="bcvk-cidata-", dir=output.parent) as tmp:
        for name, content in files:
            source = Path(tmp) / name
            source.write_text(content)
            run.run([mcopy, "-i", output, source, f"::{name}"])
    return True
