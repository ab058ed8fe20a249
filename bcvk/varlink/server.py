"""The sockets of ``bcvk varlink serve``: socket activation or a Unix socket.

Varlink messages are JSON objects, each ended by a NUL byte; one call at a
time per connection.  Socket activation hands bcvk fd 3 ($LISTEN_FDS): a
listening socket (``systemd-socket-activate -l PATH bcvk``, a .socket unit)
is served until bcvk is stopped, a connected one (``varlinkctl call
exec:bcvk …``, ``--accept``) until its peer hangs up.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bcvk.errors import BcvkError, UsageError
from bcvk.log import logger

LISTEN_FDS_START = 3
MAX_MESSAGE = 16 * 1024 * 1024  # a call is small; refuse a peer that never sends NUL


def activation_fd() -> int | None:
    """fd 3 when systemd-style socket activation passed bcvk exactly one socket."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    if os.environ.get("LISTEN_FDS") != "1":
        return None
    try:
        if not stat.S_ISSOCK(os.fstat(LISTEN_FDS_START).st_mode):
            return None
    except OSError:
        return None
    return LISTEN_FDS_START


def messages(conn: socket.socket) -> Iterator[bytes]:
    """Each NUL-terminated message the peer sends, until it hangs up."""
    buffer = b""
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return
        buffer += chunk
        while b"\0" in buffer:
            message, buffer = buffer.split(b"\0", 1)
            yield message
        if len(buffer) > MAX_MESSAGE:
            logger.warning("varlink: a message over %d bytes; closing", MAX_MESSAGE)
            return


def handle(service: Any, conn: socket.socket) -> None:
    """Answer CONN's calls until it hangs up."""
    with contextlib.closing(conn), contextlib.suppress(OSError):
        for message in messages(conn):
            for reply in service.handle(message):
                conn.sendall(reply + b"\0")


def accept_loop(service: Any, listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(service, conn), daemon=True).start()


def serve_activated(service: Any, fd: int) -> None:
    sock = socket.socket(fileno=fd)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for the bcvk commands the calls run
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        accept_loop(service, sock)
    else:
        handle(service, sock)


def parse_address(address: str) -> Path:
    """``unix:PATH`` → PATH (the only transport bcvk serves)."""
    if not address.startswith("unix:") or not address[5:] or "\0" in address:
        raise UsageError(
            f"invalid varlink address {address!r}", hint="use unix:PATH, e.g. unix:/run/bcvk.sock"
        )
    return Path(address[5:])


def serve_unix(service: Any, path: Path) -> None:
    """Listen on PATH until interrupted; the socket file goes with bcvk."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(os.fspath(path))
    except OSError as exc:
        listener.close()
        raise BcvkError(
            f"cannot listen on {path}: {exc.strerror}",
            hint="choose a path that does not exist yet, in a directory you can write",
        ) from exc
    try:
        # The calls start VMs and write disks as this user: nobody else may connect.
        os.chmod(path, 0o600)
        listener.listen(16)
        logger.info("varlink: serving %s on unix:%s", ", ".join(service.interfaces), path)
        accept_loop(service, listener)
    finally:
        listener.close()
        path.unlink(missing_ok=True)
