"""Host directories shared with a guest: one model, two spellings, every mount text.

A ``Share`` is a host directory the guest sees over virtiofs (or 9p where
there is no virtiofsd).  Users spell it two ways, both upstream's:

- ``bcvk ephemeral --bind HOST[:NAME]`` (``--ro-bind``): mounted at
  ``/run/virtiofs-mnt-NAME``, tag ``mount_NAME`` — ``parse_named``;
- ``bcvk libvirt --bind HOST:GUEST`` (``--bind-ro``, ``--volume HOST:TAG``):
  mounted at the absolute GUEST path — ``parse_at``.

The text the guest runs or reads to mount them is built here, purely: a
shell line for ephemeral VMs, systemd mount units carried as credentials
(systemd ≥ 256), or an fstab-recording script for older guests.
"""

from __future__ import annotations

import enum
import os
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bcvk import paths
from bcvk.errors import UsageError, os_hint


class ShareKind(enum.StrEnum):
    bind = "bind"  # read-write, mounted at a guest path
    bind_ro = "bind-ro"  # read-only, mounted at a guest path
    volume = "volume"  # raw virtiofs share: the user mounts the tag


@dataclass(frozen=True)
class Share:
    kind: ShareKind
    source: str  # host directory, absolute (on the libvirt host for remote URIs)
    target: str  # guest mount point; the tag itself for a volume
    tag: str

    @property
    def readonly(self) -> bool:
        return self.kind is ShareKind.bind_ro

    @property
    def mounted(self) -> bool:
        """Whether bcvk mounts it in the guest (a volume is left to the user)."""
        return self.kind is not ShareKind.volume


EPHEMERAL_PREFIX = "/run/virtiofs-mnt-"
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,30}")
_TAG_RE = re.compile(r"[A-Za-z0-9_.-]{1,36}")
# A guest path goes into mount units, fstab lines and shell words: no
# control characters (a newline would end the line it sits in).
_PATH_BAD = re.compile(r"[\x00-\x1f\x7f]")


def _host_dir(text: str, flag: str, spec: str) -> Path:
    path = paths.user_path(text, flag)
    try:
        exists = path.is_dir()
    except OSError as exc:  # ENAMETOOLONG, EACCES: Python 3.11 raises them
        raise UsageError(f"{flag} {spec!r}: {exc.strerror}", hint=os_hint(exc)) from None
    if not exists:
        raise UsageError(
            f"{flag} {text}: no such directory",
            hint="create it first, or fix the path before the ':'",
        )
    return path.resolve()


def parse_named(text: str, *, readonly: bool) -> Share:
    """``--bind HOST[:NAME]`` of an ephemeral VM; NAME defaults to the directory's name."""
    flag = "--ro-bind" if readonly else "--bind"
    host, _, name = text.partition(":")
    if not host:
        raise UsageError(f"invalid {flag} {text!r}", hint=f"use {flag} /host/dir[:NAME]")
    path = _host_dir(host, flag, text)
    name = name or path.name
    if not _NAME_RE.fullmatch(name):
        raise UsageError(
            f"invalid share name {name!r} in {flag} {text!r}",
            hint="names are 1-30 letters, digits, '_', '.', '-'; pick one with HOST:NAME",
        )
    return named(path, name, readonly=readonly)


HOST_STORAGE = "/run/host-container-storage"  # upstream's path for --bind-storage-ro
HOST_STORAGE_ENV = f"STORAGE_OPTS=additionalimagestore={HOST_STORAGE}"


def host_storage_setup() -> str:
    """Guest shell text (as root): make the shared store an additional image store.

    podman reads it from storage.conf (the STORAGE_OPTS environment variable,
    which bootc's tools read, is ignored by podman 4's image listing); the
    guest's /etc is a writable overlay, so this never touches the image.
    """
    store = f'additionalimagestores = ["{HOST_STORAGE}"]'
    conf = "/etc/containers/storage.conf"
    default = (
        '[storage]\ndriver = "overlay"\nrunroot = "/run/containers/storage"\n'
        'graphroot = "/var/lib/containers/storage"\n[storage.options]\n' + store + "\n"
    )
    return (
        # idempotent: a persistent (libvirt) guest keeps its /etc
        f"{{ grep -qxF {HOST_STORAGE_ENV} /etc/environment 2>/dev/null || "
        f"echo {HOST_STORAGE_ENV} >> /etc/environment; }} && export {HOST_STORAGE_ENV} && "
        f"if [ ! -e {conf} ]; then mkdir -p /etc/containers && printf '{default}' > {conf}; "
        f"elif ! grep -q additionalimagestores {conf}; then "
        f"if grep -q '^\\[storage.options\\]' {conf}; then "
        f"sed -i '/^\\[storage.options\\]/a {store}' {conf}; "
        f"else printf '\\n[storage.options]\\n{store}\\n' >> {conf}; fi; fi"
    )


def host_storage(graph_root: Path) -> Share:
    """--bind-storage-ro: the host's container storage, read-only, at upstream's path."""
    return Share(ShareKind.bind_ro, os.fspath(graph_root), HOST_STORAGE, "hoststorage")


def named(host: Path, name: str, *, readonly: bool) -> Share:
    """The ephemeral share NAME of HOST: at ``/run/virtiofs-mnt-NAME``, tag ``mount_NAME``."""
    kind = ShareKind.bind_ro if readonly else ShareKind.bind
    return Share(kind, os.fspath(host), EPHEMERAL_PREFIX + name, f"mount_{name}")


def parse_at(text: str, kind: ShareKind, *, local: bool = True) -> tuple[str, str]:
    """``--bind HOST:GUEST`` / ``--bind-ro`` / ``--volume HOST:TAG`` → (host, target).

    Split at the last ':' (host paths may contain one, guest paths may not).
    LOCAL: the host directory must exist here; otherwise it must be absolute.
    """
    flag = {"bind": "--bind", "bind-ro": "--bind-ro", "volume": "--volume"}[kind.value]
    host, sep, target = text.rpartition(":")
    if not sep or not host or not target:
        what = "TAG" if kind is ShareKind.volume else "GUEST_PATH"
        raise UsageError(f"invalid {flag} {text!r}", hint=f"use {flag} HOST_DIR:{what}")
    if kind is ShareKind.volume:
        if not _TAG_RE.fullmatch(target):
            raise UsageError(f"invalid --volume tag {target!r}", hint="use letters, digits, - _ .")
    elif not target.startswith("/") or _PATH_BAD.search(target):
        raise UsageError(
            f"invalid {flag} {text!r}: the guest path must be absolute, one line",
            hint=f"use {flag} /host/dir:/guest/dir",
        )
    if local:
        host = os.fspath(_host_dir(host, flag, text))
    elif not host.startswith("/"):
        raise UsageError(
            f"the host path {host!r} must be absolute for a remote URI",
            hint="the path is on the libvirt host: write it out from /",
        )
    return host, target


def at_guest_paths(specs: Iterable[tuple[ShareKind, str]], *, local: bool) -> tuple[Share, ...]:
    """Shares from (kind, ``HOST:GUEST``) specs, with tags numbered per kind."""
    shares: list[Share] = []
    counters = dict.fromkeys(ShareKind, 0)
    for kind, text in specs:
        host, target = parse_at(text, kind, local=local)
        tag = target if kind is ShareKind.volume else f"bcvk-{kind.value}-{counters[kind]}"
        counters[kind] += 1
        shares.append(Share(kind, host, target, tag))
    targets = [s.target for s in shares if s.mounted]
    if len(set(targets)) != len(targets):
        raise UsageError(
            "two binds mount at the same guest path", hint="give each bind its own guest path"
        )
    return tuple(shares)


# ---------------------------------------------------------------- guest text


def mount_command(share: Share, *, ninep: bool) -> str:
    """Shell text run in the guest (as root) to mount SHARE now."""
    target = shlex.quote(share.target)
    tag = shlex.quote(share.tag)
    if ninep:
        opts = "trans=virtio,version=9p2000.L,msize=524288" + (",ro" if share.readonly else "")
        mount = f"mount -t 9p -o {opts} {tag} {target}"
    else:
        mount = f"mount -t virtiofs {'-o ro ' if share.readonly else ''}{tag} {target}"
    return f"mkdir -p {target} && {mount}"


def escape_path(path: str) -> str:
    """``systemd-escape --path``: the unit name stem for a mount point."""
    stripped = "/".join(p for p in path.split("/") if p)
    if not stripped:
        return "-"
    out: list[str] = []
    for i, ch in enumerate(stripped):
        if ch == "/":
            out.append("-")
        elif ch.isascii() and (ch.isalnum() or ch in ":_" or (ch == "." and i > 0)):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def mount_unit_name(path: str) -> str:
    return escape_path(path) + ".mount"


def mount_unit(share: Share) -> str:
    """A systemd mount unit for SHARE (read-only in the guest for bind-ro)."""
    options = "ro" if share.readonly else "rw"
    return early_mount_unit(
        f"bcvk host directory {share.source}", share.tag, share.target, "virtiofs", options
    )


def early_mount_unit(description: str, what: str, where: str, fstype: str, options: str) -> str:
    """A mount unit in place before local-fs.target, so before any service (pure)."""
    return (
        "[Unit]\n"
        f"Description={description}\n"
        "DefaultDependencies=no\n"
        "After=systemd-remount-fs.service\n"
        "Before=local-fs.target umount.target\n"
        "Conflicts=umount.target\n"
        "\n"
        "[Mount]\n"
        f"What={what}\n"
        f"Where={where}\n"
        f"Type={fstype}\n"
        f"Options={options}\n"
    )


def mount_credentials(shares: Iterable[Share]) -> list[tuple[str, str]]:
    """(credential name, content) pairs that mount SHARES at boot.

    ``systemd.extra-unit.*`` and ``systemd.unit-dropin.*`` credentials need
    systemd ≥ 256 in the guest; older guests get their mounts over SSH.
    """
    creds: list[tuple[str, str]] = []
    wants: list[str] = []
    for share in shares:
        if not share.mounted:
            continue
        unit = mount_unit_name(share.target)
        creds.append((f"systemd.extra-unit.{unit}", mount_unit(share)))
        wants.append(unit)
    if wants:
        dropin = "[Unit]\n" + "".join(f"Wants={u}\n" for u in wants)
        creds.append(("systemd.unit-dropin.local-fs.target~bcvk-mounts", dropin))
    return creds


def fstab_script(shares: Iterable[Share]) -> str:
    """Shell for the guest: record SHARES in /etc/fstab and mount them now.

    For guests whose systemd cannot take mount units as credentials; the
    fstab lines make the mounts come back on every later boot.
    """
    lines = ["set -e"]
    for share in shares:
        if not share.mounted:
            continue
        options = "ro" if share.readonly else "rw"
        entry = f"{share.tag} {_fstab_escape(share.target)} virtiofs {options},nofail 0 0"
        target = shlex.quote(share.target)
        lines += [
            f"mkdir -p {target}",
            f"grep -qxF {shlex.quote(entry)} /etc/fstab || echo {shlex.quote(entry)} >> /etc/fstab",
            f"mountpoint -q {target} || mount -t virtiofs -o {options} {share.tag} {target}",
        ]
    return "\n".join(lines) + "\n"


def _fstab_escape(path: str) -> str:
    return path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")
