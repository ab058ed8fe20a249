"""libvirt connection URIs: which one by default, and what one says (pure).

``qemu:///system``, ``qemu:///session``, ``qemu+ssh://user@host/system?keyfile=…``,
``test:///default``: whether the host is remote, whether it is a session
daemon, and how SSH reaches guests behind it.
"""

from __future__ import annotations

import os
import shlex
import socket
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from bcvk.errors import UsageError


def default_uri() -> str:
    """``$LIBVIRT_DEFAULT_URI``, else qemu:///system for root, qemu:///session otherwise."""
    env = os.environ.get("LIBVIRT_DEFAULT_URI")
    if env:
        return env
    return "qemu:///system" if os.geteuid() == 0 else "qemu:///session"


@dataclass(frozen=True)
class UriInfo:
    uri: str
    driver: str  # qemu, test, …
    transport: str | None  # ssh, tcp, tls, unix, … (None: local)
    user: str | None
    host: str | None
    port: int | None
    path: str  # /system, /session, /default
    query: tuple[tuple[str, str], ...] = ()

    @property
    def remote(self) -> bool:
        """A URI naming a host (even localhost over ssh): bcvk cannot assume that
        host's files are its own, so disks go through the API and guests are
        reached through that host."""
        return bool(self.host)

    @property
    def local_host(self) -> bool:
        if not self.host:
            return True
        names = {"localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()}
        return self.host in names

    @property
    def session(self) -> bool:
        return self.path.rstrip("/").endswith("/session")

    @property
    def ssh_jump(self) -> str | None:
        """``user@host:port`` for ssh -J when guests are behind an SSH libvirt host."""
        if not self.host or self.transport not in ("ssh", "libssh", "libssh2"):
            return None
        jump = f"{self.user}@{self.host}" if self.user else self.host
        return f"{jump}:{self.port}" if self.port else jump

    def param(self, name: str) -> str | None:
        return next((v for k, v in self.query if k == name), None)

    @property
    def ssh_proxy_command(self) -> str | None:
        """A ProxyCommand reaching the libvirt host the way libvirt's ssh transport does.

        It honours the URI's ``keyfile``, ``no_verify`` and ``known_hosts``
        parameters and the user's own ssh configuration, and forwards to the
        guest's loopback port on that host (``-W %h:%p``).
        """
        if not self.host or self.transport not in ("ssh", "libssh", "libssh2"):
            return None
        argv = [self.param("command") or "ssh", "-o", "BatchMode=yes"]
        if self.port:
            argv += ["-p", str(self.port)]
        if self.user:
            argv += ["-l", self.user]
        if keyfile := self.param("keyfile"):
            argv += ["-i", keyfile]
        if self.param("no_verify") == "1":
            argv += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
        elif known_hosts := self.param("known_hosts"):
            argv += ["-o", f"UserKnownHostsFile={known_hosts}"]
        argv += ["-W", "%h:%p", self.host]
        return " ".join(shlex.quote(a) if a != "%h:%p" else a for a in argv)


def parse_uri(uri: str) -> UriInfo:
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:  # an out-of-range or non-numeric port, a bad IPv6 host
        raise UsageError(
            f"invalid libvirt URI {uri!r}: {exc}",
            hint="for example qemu:///system or qemu+ssh://user@host/system",
        ) from None
    scheme = parts.scheme
    driver, _, transport = scheme.partition("+")
    return UriInfo(
        uri=uri,
        driver=driver,
        transport=transport or None,
        user=parts.username,
        host=parts.hostname,
        port=port,
        path=parts.path or "/",
        query=tuple(parse_qsl(parts.query)),
    )
