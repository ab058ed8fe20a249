"""Pool.refresh waits out libvirt's "asynchronous jobs running" refusal, nothing else."""

from __future__ import annotations

from typing import Any

import libvirt  # type: ignore[import-untyped,unused-ignore]
import pytest

from bcvk.libvirt.connection import LibvirtError, Pool


class FakeRawPool:
    def __init__(self, failures: list[str]) -> None:
        self.failures = failures
        self.calls = 0

    def name(self) -> str:
        return "default"

    def refresh(self, _flags: int) -> None:
        self.calls += 1
        if self.failures:
            raise libvirt.libvirtError(self.failures.pop(0))


def pool(raw: FakeRawPool) -> Pool:
    conn: Any = None
    return Pool(conn, raw)


def test_refresh_retries_while_another_client_builds_a_volume() -> None:
    busy = "internal error: pool 'default' has asynchronous jobs running."
    raw = FakeRawPool([busy, busy, busy])
    pool(raw).refresh(timeout=10)
    assert raw.calls == 4


def test_refresh_gives_up_on_a_busy_pool_after_its_timeout() -> None:
    busy = "internal error: pool 'default' has asynchronous jobs running."
    raw = FakeRawPool([busy] * 100)
    with pytest.raises(LibvirtError, match="asynchronous jobs"):
        pool(raw).refresh(timeout=0.6)
    assert 2 <= raw.calls < 10


def test_refresh_reports_other_errors_at_once() -> None:
    raw = FakeRawPool(["cannot open directory '/gone': No such file or directory"])
    with pytest.raises(LibvirtError, match="refreshing pool default: cannot open directory"):
        pool(raw).refresh()
    assert raw.calls == 1
