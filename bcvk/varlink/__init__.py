"""Upstream bcvk's varlink API: ``io.bootc.vk.images``, ``.ephemeral``, ``.todisk``.

The same method, field and error names as upstream (the interface files
beside this module are the definitions ``org.varlink.service`` returns), for
integrations that want a protocol rather than CLI text.  Each call runs the
bcvk CLI itself as a child process with JSON output, so the API cannot
disagree with the commands: the same validation, the same clean-up, and a VM
started by ``Run`` is an ordinary ``bcvk ephemeral`` VM.

The python-varlink library does the protocol (introspection, parameter
checks, errors); ``bcvk.varlink.server`` the sockets.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import varlink  # type: ignore[import-untyped]

from bcvk import __version__, run

INTERFACE_DIR = Path(__file__).parent
INTERFACES = ("io.bootc.vk.images", "io.bootc.vk.ephemeral", "io.bootc.vk.todisk")
# Upstream's reply for formats it does not know starts with these words.
FORMATS = ("raw", "qcow2", "vmdk", "vhd", "vhdx", "ova")


class CallFailed(Exception):
    """A bcvk command failed; MESSAGE is its `error:` line."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def bcvk(*args: str) -> str:
    """Run `bcvk ARGS…` (this installation) and return its stdout; CallFailed on failure."""
    result = run.run([sys.executable, "-m", "bcvk", *args], check=False, timeout=3600)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
        raise CallFailed((errors or lines or [f"bcvk exited with status {result.returncode}"])[-1])
    return str(result.stdout)


def _error(interface: str, name: str, message: str) -> varlink.VarlinkError:
    return varlink.VarlinkError(
        {"error": f"{interface}.{name}", "parameters": {"message": message}}
    )


class Images:
    def List(self) -> dict[str, Any]:  # noqa: N802 - varlink's method name
        try:
            entries = json.loads(bcvk("images", "list", "--json"))
        except CallFailed as exc:
            raise _error("io.bootc.vk.images", "PodmanError", exc.message) from None
        return {"images": sorted(n for e in entries for n in e.get("Names") or [])}


# Run's options as `bcvk ephemeral run` flags: (flag, takes a list).
_RUN_FLAGS = {
    "name": ("--name", False),
    "itype": ("--itype", False),
    "memory": ("--memory", False),
    "vcpus": ("--vcpus", False),
    "bind": ("--bind", True),
    "ro_bind": ("--ro-bind", True),
    "mount_disk_files": ("--mount-disk-file", True),
    "kargs": ("--karg", True),
    "add_swap": ("--add-swap", False),
}
# Options of upstream's containers that a bcvk VM has no counterpart for.
_REFUSED = {
    "network": "bcvk's ephemeral VMs have user-mode networking only",
    "env": "there is no container to set the environment of",
    "label": "labels on ephemeral VMs are not supported yet",
    "console": "no terminal to show it on; use `bcvk ephemeral run --log-dir console=DIR`",
}


def run_argv(image: str, opts: dict[str, Any] | None) -> list[str]:
    """`bcvk ephemeral run -d` arguments for Run(IMAGE, OPTS) (pure)."""
    argv = ["ephemeral", "run", "-d"]
    for key, value in (opts or {}).items():
        if value is None or key in ("ssh_keygen", "rm"):
            continue  # bcvk always makes a key, and always removes a stopped VM
        if key in _REFUSED:
            if value:
                raise CallFailed(f"opts.{key}: {_REFUSED[key]}")
            continue
        flag, many = _RUN_FLAGS[key]
        values = value if many else [value]
        if not isinstance(values, list) or not all(isinstance(v, str | int) for v in values):
            raise CallFailed(f"opts.{key}: expected {'a list of strings' if many else 'a value'}")
        # FLAG=VALUE: a value that starts with '-' stays the flag's value.
        argv += [f"{flag}={v}" for v in values]
    return [*argv, "--", image]


class Ephemeral:
    _interface = "io.bootc.vk.ephemeral"

    def _call(self, *args: str) -> str:
        try:
            return bcvk(*args)
        except CallFailed as exc:
            raise _error(self._interface, "PodmanError", exc.message) from None

    def _ps(self) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = json.loads(self._call("ephemeral", "ps", "--format", "json"))
        return listed

    def Ps(self) -> dict[str, Any]:  # noqa: N802 - varlink's method name
        return {"container_ids": [vm["name"] for vm in self._ps()]}

    def Run(self, image: str, opts: dict[str, Any] | None) -> dict[str, Any]:  # noqa: N802
        try:
            argv = run_argv(image, opts)
        except CallFailed as exc:
            raise _error(self._interface, "PodmanError", exc.message) from None
        return {"container_id": self._call(*argv).strip()}

    def GetSshConnectionInfo(self, container_id: str) -> dict[str, Any]:  # noqa: N802
        for vm in self._ps():
            if vm["name"] == container_id:
                return {
                    "container_id": container_id,
                    "key_path": vm["ssh_private_key_path"],
                    "user": "root",
                    "host": "127.0.0.1",
                    "port": vm["ssh_port"],
                }
        raise _error(self._interface, "PodmanError", f"no ephemeral VM named {container_id!r}")


class ToDisk:
    def ToDisk(  # noqa: N802 - varlink's method name
        self,
        source_image: str,
        target_disk: str,
        format: str | None,  # noqa: A002 - upstream's parameter name
        disk_size: str | None,
        filesystem: str | None,
        root_size: str | None,
        kargs: list[str] | None,
    ) -> dict[str, Any]:
        fmt = format or "raw"
        if fmt not in FORMATS:
            raise _error(
                "io.bootc.vk.todisk", "Failed",
                f"unsupported disk format: {fmt!r}, expected one of {', '.join(FORMATS)}",
            )  # fmt: skip
        if not os.path.isabs(target_disk):
            # Relative to what? The server's directory is not the caller's.
            raise _error("io.bootc.vk.todisk", "Failed",
                         f"target_disk must be an absolute path, not {target_disk!r}")  # fmt: skip
        argv = ["to-disk", "--json", f"--format={fmt}"]
        for flag, value in (
            ("--disk-size", disk_size), ("--filesystem", filesystem), ("--root-size", root_size),
        ):  # fmt: skip
            if value is not None:
                argv.append(f"{flag}={value}")
        argv += [f"--karg={k}" for k in kargs or ()]
        try:
            result = json.loads(bcvk(*argv, "--", source_image, target_disk))
        except CallFailed as exc:
            raise _error("io.bootc.vk.todisk", "Failed", exc.message) from None
        return {"path": result["path"], "cached": result["action"] == "reused"}


def service() -> varlink.Service:
    """The service with the three interfaces (and org.varlink.service)."""
    served = varlink.Service(
        vendor="io.bootc.vk",
        product="bcvk",
        version=__version__,
        url="https://github.com/bootc-dev/bcvk",
        interface_dir=str(INTERFACE_DIR),
    )
    for name, handler in zip(INTERFACES, (Images, Ephemeral, ToDisk), strict=True):
        served.interface(name)(handler)
    return served
