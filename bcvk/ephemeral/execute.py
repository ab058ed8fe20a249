"""``ephemeral run --execute``: follow the commands the guest runs by itself.

The commands arrive as a system credential and run in ``bcvk-execute.service``
(``bcvk.guest.initrd``), whose stdout, stderr and final status come back on
virtio-serial ports that QEMU writes to files in the VM's directory.  No SSH
is involved, so this works with sshd masked or absent.  The guest powers
off when the commands end, which ends QEMU.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import BinaryIO

from bcvk.ephemeral.vm import Vm, boot_report
from bcvk.errors import BcvkError
from bcvk.log import console_tail


class _Tail:
    """New bytes of a file another process appends to."""

    def __init__(self, path: Path, sink: BinaryIO) -> None:
        self.path, self.sink, self.offset = path, sink, 0

    def pump(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        if data:
            self.offset += len(data)
            self.sink.write(data)
            self.sink.flush()


def exit_status(text: str) -> int | None:
    """The commands' exit status from execute-done.sh's line, or None if not there yet."""
    fields = dict(word.partition("=")[::2] for word in text.split())
    if "code" not in fields:
        return None
    status = fields.get("status", "")
    if fields["code"] == "exited" and status.isdigit():
        return int(status)
    try:  # killed or dumped: systemd names the signal (TERM, SEGV…); a shell's convention
        return 128 + signal.Signals["SIG" + status].value
    except KeyError:
        return 1


def follow(vm: Vm, stdout: BinaryIO, stderr: BinaryIO, *, poll: float = 0.2) -> int:
    """Copy the commands' output as it arrives until the VM ends; their exit status."""
    tails = [_Tail(vm.dir.execute("stdout"), stdout), _Tail(vm.dir.execute("stderr"), stderr)]
    while True:
        for child in vm.children:
            child.poll()
        alive = vm.alive()
        for tail in tails:
            tail.pump()
        if not alive:
            break
        got = boot_report(vm)
        if got is not None and not got.execute_present:
            raise BcvkError(
                f"VM {vm.name} did not receive the --execute commands "
                "(the bcvk.execute system credential was not imported)",
                hint="the image's systemd must import SMBIOS credentials (systemd 252 or newer)",
            )
        time.sleep(poll)
    try:
        status = exit_status(vm.dir.execute("status").read_text())
    except OSError:
        status = None
    if status is None:
        lines = "\n".join("  console: " + line for line in console_tail(vm.console_log, 8))
        raise BcvkError(
            f"VM {vm.name} stopped before the --execute commands finished"
            + ("\n" + lines if lines else ""),
            hint="rerun with --console to watch the boot",
        )
    return status
