"""podman helpers that need no podman."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from bcvk import run
from bcvk.host import podman


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    monkeypatch.setattr(podman, "podman", lambda: "podman")
    monkeypatch.setattr(podman, "mount_image", lambda ref: Path("/mnt") / ref)
    monkeypatch.setattr(podman, "unmount_image", lambda ref: seen.append(f"unmount {ref}"))

    def spawn(argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        seen.append("spawn " + " ".join(argv[-3:]) + f" die_with_parent={kw['die_with_parent']}")
        return subprocess.Popen(["true"])

    monkeypatch.setattr(run, "spawn", spawn)
    return seen


def test_an_image_mount_unmounts_when_the_block_ends(calls: list[str]) -> None:
    with podman.image_mount("img") as mount:
        assert mount.path == Path("/mnt/img")
        assert calls == []
    assert calls == ["unmount img"]


def test_release_unmounts_in_the_background_once_and_survives_bcvk(calls: list[str]) -> None:
    with podman.image_mount("img") as mount:
        mount.release()
        mount.release()
    assert calls == ["spawn image unmount img die_with_parent=False"]


def test_an_error_in_the_block_still_unmounts(calls: list[str]) -> None:
    with pytest.raises(RuntimeError), podman.image_mount("img"):
        raise RuntimeError("boom")
    assert calls == ["unmount img"]


def test_mounted_yields_the_path_and_unmounts(calls: list[str]) -> None:
    with podman.mounted("img") as path:
        assert path == Path("/mnt/img")
    assert calls == ["unmount img"]
