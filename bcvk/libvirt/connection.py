"""The one module that talks to libvirt-python.

Everything else in bcvk sees small typed wrappers (``Connection``,
``DomainRef``, ``Pool``, ``Volume``) and ``BcvkError``s with hints, never a
``libvirt.libvirtError``.  The binding is imported on first use so that
``bcvk --help`` does not pay for it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from bcvk.errors import BcvkError, NotFoundError, ToolMissingError
from bcvk.libvirt.uri import default_uri, parse_uri
from bcvk.log import logger
from bcvk.wait import Deadline

T = TypeVar("T")

DEFAULT_POOL = "default"
SYSTEM_POOL_PATH = Path("/var/lib/libvirt/images")

START_HINT = (
    "start libvirt: `systemctl start libvirtd` (or virtqemud), or on hosts without "
    "systemd run `virtlogd -d && libvirtd -d` as root; pick another URI with -c"
)


_LIBVIRT_HINT = (
    "libvirt refused; its log has the details (journalctl -u libvirtd or virtqemud, "
    "or /var/log/libvirt/)"
)


class LibvirtError(BcvkError):
    """A libvirt call failed; carries libvirt's error code."""

    def __init__(self, message: str, hint: str | None = None, code: int = 0) -> None:
        # libvirt's own message is the detail; its daemon log has the rest.
        super().__init__(message, hint or _LIBVIRT_HINT)
        self.code = code


class DomainNotFound(NotFoundError):
    pass


@functools.cache
def binding() -> ModuleType:
    """libvirt-python, imported once, with libvirt's stderr error printer silenced."""
    try:
        import libvirt  # type: ignore[import-untyped,unused-ignore]
    except ImportError as exc:  # pragma: no cover - a packaging problem
        raise ToolMissingError(
            "the libvirt Python binding is not installed",
            hint="pip install libvirt-python (needs libvirt-dev and pkg-config), "
            "or apt-get install python3-libvirt",
        ) from exc
    # libvirt prints every error on stderr by default; we report them ourselves.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    mod: ModuleType = libvirt
    return mod


def _code(exc: Exception) -> int:
    get = getattr(exc, "get_error_code", None)
    code = get() if callable(get) else 0
    return int(code or 0)


def _message(exc: Exception) -> str:
    get = getattr(exc, "get_error_message", None)
    text = get() if callable(get) else None
    return str(text or exc).strip()


@contextlib.contextmanager
def translate(what: str, hint: str | None = None) -> Iterator[None]:
    """Turn a libvirtError raised in the block into a LibvirtError about WHAT."""
    lv = binding()
    try:
        yield
    except lv.libvirtError as exc:
        raise LibvirtError(f"{what}: {_message(exc)}", hint=hint, code=_code(exc)) from exc


def _unless_missing(what: str, missing: str, fn: Callable[[], T]) -> T | None:
    """FN's result, or None when libvirt answers with the error code named MISSING."""
    lv = binding()
    try:
        return fn()
    except lv.libvirtError as exc:
        if _code(exc) == getattr(lv, missing):
            return None
        raise LibvirtError(f"{what}: {_message(exc)}", code=_code(exc)) from exc


class Connection:
    """An open libvirt connection (use ``connect()`` to get one)."""

    def __init__(self, uri: str | None = None) -> None:
        self.requested_uri = uri or default_uri()
        self.info = parse_uri(self.requested_uri)
        lv = binding()
        try:
            self.raw: Any = lv.open(self.requested_uri)
        except lv.libvirtError as exc:
            hint = START_HINT
            if self.info.transport in ("ssh", "libssh"):
                hint = (
                    "check that `ssh "
                    f"{self.info.ssh_jump or self.info.host}` works without a password "
                    "and that libvirtd runs on that host"
                )
            raise LibvirtError(
                f"cannot connect to libvirt at {self.requested_uri}: {_message(exc)}",
                hint=hint,
                code=_code(exc),
            ) from exc
        if self.raw is None:  # pragma: no cover - old bindings returned None
            raise LibvirtError(f"cannot connect to libvirt at {self.requested_uri}", START_HINT)

    # -- connection facts

    @property
    def uri(self) -> str:
        with translate("reading the connection URI"):
            return str(self.raw.getURI())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.raw.close()

    def lib_version(self) -> tuple[int, int, int]:
        with translate("reading libvirt's version"):
            return _version_tuple(int(self.raw.getLibVersion()))

    def hypervisor_version(self) -> tuple[int, int, int] | None:
        try:
            return _version_tuple(int(self.raw.getVersion()))
        except binding().libvirtError:
            return None

    def hypervisor_type(self) -> str:
        with translate("reading the hypervisor type"):
            return str(self.raw.getType())

    def hostname(self) -> str:
        with translate("reading the libvirt host name"):
            return str(self.raw.getHostname())

    def domain_capabilities(self, arch: str, machine: str, virttype: str) -> str | None:
        """virConnectGetDomainCapabilities XML, None where the driver has none."""
        try:
            return str(self.raw.getDomainCapabilities(None, arch, machine, virttype, 0))
        except binding().libvirtError:
            return None

    def capabilities(self) -> str:
        with translate("reading host capabilities"):
            return str(self.raw.getCapabilities())

    # -- domains

    def domains(self) -> list[DomainRef]:
        with translate("listing domains"):
            return [DomainRef(self, d) for d in self.raw.listAllDomains(0)]

    def lookup(self, name: str) -> DomainRef | None:
        raw = _unless_missing(
            f"looking up domain {name}", "VIR_ERR_NO_DOMAIN", lambda: self.raw.lookupByName(name)
        )
        return None if raw is None else DomainRef(self, raw)

    def get(self, name: str) -> DomainRef:
        dom = self.lookup(name)
        if dom is None:
            raise DomainNotFound(
                f"no domain named {name!r} at {self.requested_uri}",
                hint="list bcvk's VMs with `bcvk libvirt list --all`",
            )
        return dom

    def define(self, xml: str) -> DomainRef:
        with translate("defining the domain"):
            return DomainRef(self, self.raw.defineXML(xml))

    def create_transient(self, xml: str) -> DomainRef:
        with translate("starting the transient domain"):
            return DomainRef(self, self.raw.createXML(xml, 0))

    # -- storage

    def pool(self, name: str) -> Pool | None:
        raw = _unless_missing(
            f"looking up storage pool {name}",
            "VIR_ERR_NO_STORAGE_POOL",
            lambda: self.raw.storagePoolLookupByName(name),
        )
        return None if raw is None else Pool(self, raw)

    def volume_by_path(self, path: str) -> Volume | None:
        """The storage volume whose file is PATH, in whichever pool holds it."""
        raw = _unless_missing(
            f"looking up volume {path}",
            "VIR_ERR_NO_STORAGE_VOL",
            lambda: self.raw.storageVolLookupByPath(path),
        )
        if raw is None:
            return None
        with translate(f"looking up the pool of volume {path}"):
            return Volume(Pool(self, raw.storagePoolLookupByVolume()), raw)

    def default_pool_path(self) -> Path:
        if self.info.session:
            if self.info.remote:
                raise LibvirtError(
                    "cannot create the default storage pool of a remote session daemon",
                    hint="create it on that host: virsh pool-define-as default dir "
                    "--target ~/.local/share/libvirt/images; virsh pool-start default",
                )
            data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
            return Path(data) / "libvirt" / "images"
        return SYSTEM_POOL_PATH

    def ensure_pool(self, name: str = DEFAULT_POOL) -> Pool:
        """The named pool, active; ``default`` is created as a dir pool if missing."""
        pool = self.pool(name)
        if pool is None:
            if name != DEFAULT_POOL:
                raise NotFoundError(
                    f"storage pool {name!r} does not exist at {self.requested_uri}",
                    hint="create it with `virsh pool-define-as`, or omit --pool to use default",
                )
            path = self.default_pool_path()
            logger.info("Creating storage pool %s at %s", name, path)
            xml = (
                "<pool type='dir'><name>default</name>"
                f"<target><path>{_xml_escape(str(path))}</path></target></pool>"
            )
            lv = binding()
            try:
                raw = self.raw.storagePoolDefineXML(xml, 0)
            except lv.libvirtError:
                # Another bcvk may have defined it at the same moment.
                pool = self.pool(name)
                if pool is None:
                    raise
            else:
                pool = Pool(self, raw)
                with translate(f"building storage pool {name}"):
                    raw.build(0)
                with contextlib.suppress(lv.libvirtError):
                    raw.setAutostart(1)
        if not pool.active():
            with translate(f"starting storage pool {name}"):
                pool.raw.create(0)
        return pool

    def upload_stream(self) -> Any:
        with translate("opening a stream"):
            return self.raw.newStream(0)


def _version_tuple(number: int) -> tuple[int, int, int]:
    return number // 1_000_000, (number // 1000) % 1000, number % 1000


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _state_name(state: int) -> str:
    lv = binding()
    names = {
        lv.VIR_DOMAIN_NOSTATE: "no state",
        lv.VIR_DOMAIN_RUNNING: "running",
        lv.VIR_DOMAIN_BLOCKED: "running",
        lv.VIR_DOMAIN_PAUSED: "paused",
        lv.VIR_DOMAIN_SHUTDOWN: "shutting down",
        lv.VIR_DOMAIN_SHUTOFF: "shut off",
        lv.VIR_DOMAIN_CRASHED: "crashed",
        lv.VIR_DOMAIN_PMSUSPENDED: "suspended",
    }
    return names.get(state, "unknown")


class DomainRef:
    """A handle on one domain; every call may find it deleted behind our back."""

    def __init__(self, conn: Connection, raw: Any) -> None:
        self.conn = conn
        self.raw = raw
        self.name: str = str(raw.name())

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        lv = binding()
        try:
            return fn()
        except lv.libvirtError as exc:
            if _code(exc) == lv.VIR_ERR_NO_DOMAIN:
                raise DomainNotFound(
                    f"domain {self.name!r} disappeared while {what}",
                    hint="it was removed by someone else; `bcvk libvirt list --all` shows "
                    "what is left",
                ) from exc
            raise LibvirtError(
                f"{what} domain {self.name}: {_message(exc)}", code=_code(exc)
            ) from exc

    @property
    def uuid(self) -> str:
        return self._call("reading", lambda: str(self.raw.UUIDString()))

    def state(self) -> str:
        return self._call("reading the state of", lambda: _state_name(self.raw.state()[0]))

    def is_active(self) -> bool:
        return self._call("reading the state of", lambda: bool(self.raw.isActive()))

    def is_persistent(self) -> bool:
        return self._call("reading", lambda: bool(self.raw.isPersistent()))

    def xml(self, inactive: bool = False) -> str:
        flags = binding().VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return self._call("reading the XML of", lambda: str(self.raw.XMLDesc(flags)))

    def metadata_xml(self, namespace: str) -> str | None:
        """Our ``<metadata>`` element, or None when the domain has none of ours."""
        lv = binding()
        try:
            return str(self.raw.metadata(lv.VIR_DOMAIN_METADATA_ELEMENT, namespace, 0))
        except lv.libvirtError as exc:
            if _code(exc) == lv.VIR_ERR_NO_DOMAIN_METADATA:
                return None
            if _code(exc) == lv.VIR_ERR_NO_DOMAIN:
                raise DomainNotFound(
                    f"domain {self.name!r} disappeared",
                    hint="it was removed meanwhile; `bcvk libvirt list --all` shows what is left",
                ) from exc
            raise LibvirtError(f"reading metadata of {self.name}: {_message(exc)}") from exc

    def start(self) -> None:
        self._call("starting", lambda: self.raw.create())

    def shutdown(self) -> None:
        self._call("shutting down", lambda: self.raw.shutdown())

    def destroy(self) -> None:
        self._call("stopping", lambda: self.raw.destroy())

    def undefine(self) -> None:
        lv = binding()
        flags = (
            lv.VIR_DOMAIN_UNDEFINE_NVRAM
            | lv.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | lv.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | getattr(lv, "VIR_DOMAIN_UNDEFINE_TPM", 0)
        )
        try:
            self.raw.undefineFlags(flags)
        except lv.libvirtError as exc:
            if _code(exc) == lv.VIR_ERR_NO_DOMAIN:
                return
            if _code(exc) in (lv.VIR_ERR_NO_SUPPORT, lv.VIR_ERR_INVALID_ARG):
                # Drivers without NVRAM/TPM (test:///) reject those flags.
                self._call("undefining", lambda: self.raw.undefine())
                return
            raise LibvirtError(f"undefining domain {self.name}: {_message(exc)}") from exc


class Pool:
    def __init__(self, conn: Connection, raw: Any) -> None:
        self.conn = conn
        self.raw = raw
        self.name: str = str(raw.name())

    def active(self) -> bool:
        with translate(f"reading storage pool {self.name}"):
            return bool(self.raw.isActive())

    def path(self) -> Path:
        with translate(f"reading storage pool {self.name}"):
            root = ET.fromstring(self.raw.XMLDesc(0))
        text = root.findtext("target/path")
        if not text:
            raise LibvirtError(
                f"storage pool {self.name} has no target path",
                hint="bcvk needs a directory (dir) pool",
            )
        return Path(text)

    def refresh(self, timeout: float = 300.0) -> None:
        lv = binding()
        # libvirt refuses a refresh while any client is building a volume in the pool
        # ("has asynchronous jobs running"); two bcvk runs side by side hit that, and a
        # clone can hold the job for minutes, so wait it out rather than fail.
        deadline = Deadline(timeout)
        while True:
            try:
                self.raw.refresh(0)
                return
            except lv.libvirtError as exc:
                busy = "asynchronous jobs" in _message(exc)
                if not busy or deadline.expired:
                    raise LibvirtError(f"refreshing pool {self.name}: {_message(exc)}") from exc
                time.sleep(min(0.5, deadline.remaining))

    def volumes(self) -> list[Volume]:
        with translate(f"listing volumes of pool {self.name}"):
            return [Volume(self, v) for v in self.raw.listAllVolumes(0)]

    def volume(self, name: str) -> Volume | None:
        raw = _unless_missing(
            f"looking up volume {name}",
            "VIR_ERR_NO_STORAGE_VOL",
            lambda: self.raw.storageVolLookupByName(name),
        )
        return None if raw is None else Volume(self, raw)

    def create_volume(self, xml: str, what: str) -> Volume:
        with translate(f"creating volume {what} in pool {self.name}"):
            return Volume(self, self.raw.createXML(xml, 0))


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    path: str
    format: str
    capacity: int
    allocation: int
    backing_path: str | None
    mtime: float | None


class Volume:
    def __init__(self, pool: Pool, raw: Any) -> None:
        self.pool = pool
        self.raw = raw
        self.name: str = str(raw.name())

    @property
    def path(self) -> str:
        with translate(f"reading volume {self.name}"):
            return str(self.raw.path())

    def info(self) -> VolumeInfo:
        with translate(f"reading volume {self.name}"):
            root = ET.fromstring(self.raw.XMLDesc(0))
        return volume_info(root)

    def delete(self) -> None:
        # Already gone is what the caller wanted.
        _unless_missing(
            f"deleting volume {self.name}", "VIR_ERR_NO_STORAGE_VOL", lambda: self.raw.delete(0)
        )

    def upload(self, source: Path, progress: Callable[[int], None] | None = None) -> None:
        """Stream SOURCE's bytes into the volume through the libvirt API."""
        size = source.stat().st_size
        stream = self.pool.conn.upload_stream()
        sent = 0

        def handler(_stream: Any, nbytes: int, fh: Any) -> bytes:
            nonlocal sent
            data: bytes = fh.read(min(nbytes, 4 * 1024 * 1024))
            sent += len(data)
            if progress is not None:
                progress(sent)
            return data

        lv = binding()
        with source.open("rb") as fh:
            try:
                self.raw.upload(stream, 0, size, 0)
                stream.sendAll(handler, fh)
                stream.finish()
            except lv.libvirtError as exc:
                with contextlib.suppress(lv.libvirtError):
                    stream.abort()
                raise LibvirtError(f"uploading into volume {self.name}: {_message(exc)}") from exc


def volume_info(root: ET.Element) -> VolumeInfo:
    def number(path: str) -> int:
        text = root.findtext(path) or "0"
        unit = root.find(path)
        factor = 1
        if unit is not None and unit.get("unit", "bytes") not in ("bytes", "B", "b"):
            factor = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}.get(unit.get("unit", ""), 1)
        return int(text) * factor

    mtime_text = root.findtext("target/timestamps/mtime")
    mtime = None
    if mtime_text and re.match(r"^\d+(\.\d+)?$", mtime_text.strip()):
        mtime = float(mtime_text)
    fmt = root.find("target/format")
    return VolumeInfo(
        name=root.findtext("name", ""),
        path=root.findtext("target/path", ""),
        format=fmt.get("type", "raw") if fmt is not None else "raw",
        capacity=number("capacity"),
        allocation=number("allocation"),
        backing_path=root.findtext("backingStore/path"),
        mtime=mtime,
    )


@contextlib.contextmanager
def connect(uri: str | None = None) -> Iterator[Connection]:
    conn = Connection(uri)
    try:
        yield conn
    finally:
        conn.close()


# ------------------------------------------------------------------ added for `bcvk pb`


def ensure_dir_pool(conn: Connection, name: str, path: Path) -> Pool:
    """Pool NAME as an active dir pool at PATH, defined (and the directory made) if missing.

    ``bcvk pb`` keeps qemu:///session disks under podman-bootc's cache dir.
    """
    pool = conn.pool(name)
    if pool is None:
        path.mkdir(parents=True, exist_ok=True)
        logger.info("Creating storage pool %s at %s", name, path)
        xml = (
            f"<pool type='dir'><name>{_xml_escape(name)}</name>"
            f"<target><path>{_xml_escape(str(path))}</path></target></pool>"
        )
        lv = binding()
        try:
            raw = conn.raw.storagePoolDefineXML(xml, 0)
        except lv.libvirtError:
            pool = conn.pool(name)  # defined by a concurrent bcvk
            if pool is None:
                raise
        else:
            pool = Pool(conn, raw)
            with contextlib.suppress(lv.libvirtError):
                raw.setAutostart(1)
    if not pool.active():
        with translate(f"starting storage pool {name}"):
            pool.raw.create(0)
    return pool
