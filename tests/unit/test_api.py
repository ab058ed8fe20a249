"""The Python API the README documents stays importable where it says."""

from __future__ import annotations

import importlib

import pytest

DOCUMENTED = {
    "bcvk.ephemeral": ["start", "run_ssh", "Vm", "Options", "make_options", "ps", "rm", "rm_all"],
    "bcvk.to_disk": ["build", "Options", "Result", "DiskFormat", "Filesystem"],
    "bcvk.libvirt": [
        "run", "create", "ssh", "list_vms", "inspect", "stop", "start", "rm", "rm_all",
        "RunOptions", "Vm", "Firmware", "PortForward",
    ],
    "bcvk.libvirt.domains": ["run", "ssh_command", "list_vms", "inspect", "stop", "start", "rm"],
    "bcvk.pb": ["run", "RunOptions", "ssh", "list_vms", "stop", "start", "rm", "rm_all", "inspect"],
}  # fmt: skip


@pytest.mark.parametrize("module", sorted(DOCUMENTED))
def test_documented_names_import(module: str) -> None:
    loaded = importlib.import_module(module)
    missing = [name for name in DOCUMENTED[module] if getattr(loaded, name, None) is None]
    assert missing == []
    assert set(DOCUMENTED[module]) <= set(getattr(loaded, "__all__", DOCUMENTED[module]))
