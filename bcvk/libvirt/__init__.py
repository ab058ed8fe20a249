"""Persistent VMs through the libvirt API (``bcvk libvirt``), as a Python API.

::

    from bcvk import libvirt
    vm = libvirt.run("localhost/bcvk/debian-bootc:12", name="t1", ssh_wait=True)
    result = libvirt.ssh("t1", ["cat", "/etc/os-release"])
    libvirt.stop("t1"); libvirt.start("t1", ssh_wait=True)
    libvirt.rm("t1", force=True)

Every function takes ``uri=`` (default: ``$LIBVIRT_DEFAULT_URI``, else
qemu:///system for root and qemu:///session otherwise).

The package: ``uri`` and ``connection`` (libvirt itself), ``xml`` (domain
XML as typed objects), ``vms`` (bcvk's view of a domain), ``basedisks``
(shared base disks), ``lifecycle`` (operations on a domain), ``provision``
(making one), ``domains`` (the verbs, offered here).  The names below are
imported on first use, so that a light submodule (``xml``, what ``pb ssh``
needs) does not load the disk builder with the package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bcvk.libvirt.domains import (
        base_disks as base_disks,
    )
    from bcvk.libvirt.domains import (
        create as create,
    )
    from bcvk.libvirt.domains import (
        domain_xml as domain_xml,
    )
    from bcvk.libvirt.domains import (
        find as find,
    )
    from bcvk.libvirt.domains import (
        inspect as inspect,
    )
    from bcvk.libvirt.domains import (
        list_vms as list_vms,
    )
    from bcvk.libvirt.domains import (
        list_volumes as list_volumes,
    )
    from bcvk.libvirt.domains import (
        listing_json as listing_json,
    )
    from bcvk.libvirt.domains import (
        make_run_options as make_run_options,
    )
    from bcvk.libvirt.domains import (
        prune_base_disks as prune_base_disks,
    )
    from bcvk.libvirt.domains import (
        rm as rm,
    )
    from bcvk.libvirt.domains import (
        rm_all as rm_all,
    )
    from bcvk.libvirt.domains import (
        run as run,
    )
    from bcvk.libvirt.domains import (
        scp as scp,
    )
    from bcvk.libvirt.domains import ssh_command as ssh  # noqa: F401 - a second name
    from bcvk.libvirt.domains import (
        ssh_command as ssh_command,
    )
    from bcvk.libvirt.domains import (
        ssh_interactive as ssh_interactive,
    )
    from bcvk.libvirt.domains import (
        start as start,
    )
    from bcvk.libvirt.domains import (
        status as status,
    )
    from bcvk.libvirt.domains import (
        stop as stop,
    )
    from bcvk.libvirt.domains import (
        to_base_disk as to_base_disk,
    )
    from bcvk.libvirt.domains import (
        upload as upload,
    )
    from bcvk.libvirt.metadata import Project as Project
    from bcvk.libvirt.provision import RunOptions as RunOptions
    from bcvk.libvirt.provision import validate as validate
    from bcvk.libvirt.vms import Vm as Vm
    from bcvk.values import Firmware as Firmware
    from bcvk.values import PortForward as PortForward

_HOME = {
    "Project": "bcvk.libvirt.metadata",
    "RunOptions": "bcvk.libvirt.provision",
    "validate": "bcvk.libvirt.provision",
    "Vm": "bcvk.libvirt.vms",
    "Firmware": "bcvk.values",
    "PortForward": "bcvk.values",
}
_VERBS = (
    "base_disks", "create", "domain_xml", "find", "inspect", "list_vms", "list_volumes",
    "listing_json", "make_run_options", "to_base_disk",
    "prune_base_disks", "rm", "rm_all", "run", "scp", "ssh_command", "ssh_interactive", "start",
    "status", "stop", "upload",
)  # fmt: skip

__all__ = sorted([*_HOME, *_VERBS, "ssh"])


def __getattr__(name: str) -> Any:
    if name == "ssh":
        name = "ssh_command"
    elif name not in _HOME and name not in _VERBS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(_HOME.get(name, "bcvk.libvirt.domains"))
    return getattr(module, name)
