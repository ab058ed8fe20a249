from __future__ import annotations

from pathlib import Path

import pytest

from bcvk.errors import UsageError
from bcvk.host import accel
from tests.conftest import FakeBin


def fake_qemu(fake_bin: FakeBin, output: str, exit_code: int = 0) -> str:
    """A QEMU that prints OUTPUT (what a kernel would) and exits with EXIT_CODE."""
    return str(fake_bin.add("qemu-system-x86_64", f"cat <<'EOF'\n{output}\nEOF\nexit {exit_code}"))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("BCVK_ACCEL", raising=False)
    monkeypatch.setattr(accel, "kvm_usable", lambda: None)


def test_kernel_that_panics_for_want_of_root_proves_kvm(tmp_path: Path, fake_bin: FakeBin) -> None:
    qemu = fake_qemu(fake_bin, "[ 0.9] Kernel panic - not syncing: VFS: Unable to mount root fs")
    verdict = accel.probe_kvm(qemu, tmp_path / "vmlinuz")
    assert verdict.accel == "kvm"


def test_emulation_failure_means_tcg(tmp_path: Path, fake_bin: FakeBin) -> None:
    qemu = fake_qemu(fake_bin, "KVM internal error. Suberror: 1\nemulation failure", 1)
    verdict = accel.probe_kvm(qemu, tmp_path / "vmlinuz")
    assert verdict.accel == "tcg"
    assert "KVM internal error" in verdict.reason


def test_hang_means_tcg(tmp_path: Path) -> None:
    script = tmp_path / "qemu-hang"
    script.write_text("#!/bin/sh\nexec sleep 30\n")
    script.chmod(0o755)
    assert accel.probe_kvm(str(script), tmp_path / "k", timeout=0.5).accel == "tcg"


def test_decide_caches_per_boot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_bin: FakeBin
) -> None:
    monkeypatch.setattr(accel, "host_kernels", lambda: [tmp_path / "vmlinuz"])
    qemu = fake_qemu(fake_bin, "KVM internal error")
    assert accel.decide(qemu).accel == "tcg"
    assert accel.cache_file().exists()
    # A later probe would say kvm, but the cached verdict stands until --refresh.
    qemu_ok = fake_qemu(fake_bin, "Kernel panic")
    assert accel.decide(qemu_ok).accel == "tcg"
    assert accel.decide(qemu_ok, refresh=True).accel == "kvm"


def test_override(monkeypatch: pytest.MonkeyPatch) -> None:
    assert accel.decide("qemu", override="kvm").accel == "kvm"
    monkeypatch.setenv("BCVK_ACCEL", "tcg")
    assert accel.decide("qemu").accel == "tcg"
    monkeypatch.setenv("BCVK_ACCEL", "hvf")
    with pytest.raises(UsageError):
        accel.decide("qemu")


def test_no_kvm_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "kvm_usable", lambda: "/dev/kvm does not exist")
    verdict = accel.decide("qemu")
    assert verdict == accel.Verdict("tcg", "/dev/kvm does not exist")
