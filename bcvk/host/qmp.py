"""QEMU's control socket (QMP): asking a VM to power down or quit.

Uses the ``qemu.qmp`` library (QEMU's own asyncio client).  bcvk binds the
listening socket itself and hands QEMU the descriptor, so the socket exists
before QEMU does and its path may be longer than the 108 bytes ``sun_path``
holds (reached through ``/proc/self/fd/N/``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bcvk.log import logger

_SUN_PATH_MAX = 107


@contextlib.contextmanager
def _short_path(path: Path) -> Iterator[str]:
    """A path to PATH short enough for ``sun_path``, via an O_PATH dir fd if needed."""
    text = os.fspath(path)
    if len(text.encode()) <= _SUN_PATH_MAX:
        yield text
        return
    dirfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dirfd}/{path.name}"
    finally:
        os.close(dirfd)


def unix_listener(path: Path, backlog: int = 8) -> socket.socket:
    """A listening unix socket at PATH (replacing a stale one), inheritable."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _short_path(path) as short:
            sock.bind(short)
        os.chmod(path, 0o600)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def unix_connect(path: Path, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with _short_path(path) as short:
            sock.connect(short)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _quiet_library() -> None:
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


async def _execute(path: Path, commands: list[str], timeout: float) -> list[Any]:
    from qemu.qmp import QMPClient

    _quiet_library()
    client = QMPClient("bcvk")
    results: list[Any] = []
    try:
        await asyncio.wait_for(client.connect(unix_connect(path, timeout)), timeout)
        for command in commands:
            results.append(await asyncio.wait_for(client.execute(command), timeout))
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), timeout)
    return results


def execute(path: Path, *commands: str, timeout: float = 5.0) -> list[Any] | None:
    """Run QMP COMMANDS in order; ``None`` if QEMU could not be reached.

    Synchronous on purpose: it is called from clean-up paths, including
    ``finally`` blocks reached through KeyboardInterrupt.
    """
    try:
        return asyncio.run(_execute(path, list(commands), timeout))
    except (OSError, TimeoutError, EOFError) as exc:
        logger.debug("QMP %s on %s failed: %s", commands, path, exc)
        return None
    except Exception as exc:  # qemu.qmp's own error types (ConnectError, ExecuteError…)
        logger.debug("QMP %s on %s failed: %r", commands, path, exc)
        return None


def powerdown(path: Path) -> bool:
    """Press the virtual power button (ACPI); the guest shuts down on its own."""
    return execute(path, "system_powerdown") is not None


def quit(path: Path) -> bool:
    """Stop QEMU at once (like pulling the plug, but QEMU exits cleanly)."""
    return execute(path, "quit") is not None


def status(path: Path) -> str | None:
    result = execute(path, "query-status", timeout=2.0)
    if not result or not isinstance(result[0], dict):
        return None
    return str(result[0].get("status"))


# ---------------------------------------------------------------- saved state


class MigrationError(Exception):
    """QEMU could not save or load a machine's state (the message says why)."""


# Migration is throttled to 128 MiB/s by default: a stopped machine's
# state is written to a local file, as fast as the disk takes it.
_UNTHROTTLED = 64 << 30


async def _save(path: Path, fd: int, timeout: float) -> dict[str, Any]:
    from qemu.qmp import QMPClient

    _quiet_library()
    client = QMPClient("bcvk")
    try:
        await asyncio.wait_for(client.connect(unix_connect(path, timeout)), timeout)
        await client.execute("stop")
        try:
            await client.execute("migrate-set-parameters", {"max-bandwidth": _UNTHROTTLED})
            client.send_fd_scm(fd)
            await client.execute("getfd", {"fdname": "bcvk-state"})
            await client.execute("migrate", {"uri": "fd:bcvk-state"})
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                info = await client.execute("query-migrate")
                assert isinstance(info, dict)
                if info.get("status") == "completed":
                    return info
                if info.get("status") in ("failed", "cancelled"):
                    raise MigrationError(str(info.get("error-desc") or info.get("status")))
                if loop.time() > deadline:
                    with contextlib.suppress(Exception):
                        await client.execute("migrate_cancel")
                    raise MigrationError(f"not done after {timeout:.0f}s")
                await asyncio.sleep(0.05)
        finally:
            # The machine runs on whatever happened to its copy.
            await client.execute("cont")
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), timeout)


def save_state(path: Path, fd: int, *, timeout: float = 120.0) -> dict[str, Any]:
    """Pause the VM behind PATH, write its whole state to FD, resume it.

    Returns QEMU's ``query-migrate`` answer; raises ``MigrationError``.
    """
    try:
        return asyncio.run(_save(path, fd, timeout))
    except MigrationError:
        raise
    except Exception as exc:  # OSError, timeouts, qemu.qmp's own errors
        raise MigrationError(str(exc) or type(exc).__name__) from None


async def _resume(path: Path, timeout: float, alive: Callable[[], bool]) -> None:
    from qemu.qmp import QMPClient

    _quiet_library()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    client = QMPClient("bcvk")
    try:
        while True:
            try:
                await asyncio.wait_for(client.connect(unix_connect(path, 1.0)), 2.0)
                break
            except Exception:
                if not alive() or loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)
        while True:
            status = await client.execute("query-status")
            state = status.get("status") if isinstance(status, dict) else None
            if state == "paused":
                await client.execute("cont")
                return
            if state == "running":
                return
            if state != "inmigrate":
                raise MigrationError(f"QEMU is {state!r} after loading the state")
            if not alive() or loop.time() > deadline:
                raise MigrationError("the saved state did not load")
            await asyncio.sleep(0.05)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), 2.0)


def resume_incoming(path: Path, *, alive: Callable[[], bool], timeout: float = 60.0) -> None:
    """Wait until a QEMU started with ``-incoming`` has loaded its state, then run it.

    ALIVE says whether QEMU still runs (a state it cannot load makes it exit).
    """
    try:
        asyncio.run(_resume(path, timeout, alive))
    except MigrationError:
        raise
    except Exception as exc:
        raise MigrationError(str(exc) or type(exc).__name__) from None
