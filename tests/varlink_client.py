"""An independent varlink client for the tests: raw NUL-terminated JSON on a
Unix socket, as the protocol defines it (not the library bcvk serves with)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any


class Client:
    def __init__(self, path: Path, timeout: float = 600) -> None:
        deadline = time.monotonic() + 10
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.buffer = b""

    def call(self, method: str, **parameters: Any) -> dict[str, Any]:
        """The reply to METHOD: {"parameters": …} or {"error": NAME, "parameters": …}."""
        message: dict[str, Any] = {"method": method}
        if parameters:
            message["parameters"] = parameters
        self.sock.sendall(json.dumps(message).encode() + b"\0")
        while b"\0" not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, "the server hung up"
            self.buffer += chunk
        reply, self.buffer = self.buffer.split(b"\0", 1)
        parsed: dict[str, Any] = json.loads(reply)
        return parsed

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
