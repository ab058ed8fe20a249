"""Persistent VMs through the libvirt API (``bcvk libvirt``), as a Python API.

::

    from bcvk import libvirt
    vm = libvirt.run("localhost/bcvk/debian-bootc:12", name="t1", ssh_wait=True)
    result = libvirt.ssh("t1", ["cat", "/etc/os-release"])
    libvirt.stop("t1"); libvirt.start("t1", ssh_wait=True)
    libvirt.rm("t1", force=True)

Every function takes ``uri=`` (default: ``$LIBVIRT_DEFAULT_URI``, else
qemu:///system for root and qemu:///session otherwise).
"""

from __future__ import annotations

from bcvk.libvirt.domains import (
    RunOptions,
    base_disks,
    domain_xml,
    inspect,
    list_vms,
    prune_base_disks,
    rm,
    rm_all,
    run,
    start,
    status,
    stop,
    upload,
)
from bcvk.libvirt.domains import ssh_command as ssh
from bcvk.libvirt.vms import Vm
from bcvk.libvirt.xml import Firmware, PortForward


def create(image: str, options: RunOptions | None = None, **kwargs: object) -> Vm:
    """Define a VM without starting it (``bcvk libvirt create``)."""
    import dataclasses

    uri = kwargs.pop("uri", None)
    opts = options or RunOptions(**kwargs)  # type: ignore[arg-type]
    opts = dataclasses.replace(opts, start=False, ssh_wait=False)
    return run(image, opts, uri=uri if isinstance(uri, str) else None)


__all__ = [
    "Firmware",
    "PortForward",
    "RunOptions",
    "Vm",
    "base_disks",
    "create",
    "domain_xml",
    "inspect",
    "list_vms",
    "prune_base_disks",
    "rm",
    "rm_all",
    "run",
    "ssh",
    "start",
    "status",
    "stop",
    "upload",
]
