from __future__ import annotations

import os
from pathlib import Path

import pytest

from bcvk import paths
from bcvk.errors import BcvkError


def test_runtime_dir_prefers_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert paths.runtime_dir() == tmp_path / "bcvk"


def test_runtime_dir_falls_back_to_temp_when_no_logind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(paths, "Path", _NoRunUser)
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    assert paths.runtime_dir() == tmp_path / f"bcvk-{os.getuid()}"


class _NoRunUser(type(Path())):  # type: ignore[misc]
    def is_dir(self, *args: object, **kwargs: object) -> bool:
        if str(self).startswith("/run/user/"):
            return False
        return bool(super().is_dir())


def test_xdg_runtime_dir_that_does_not_exist_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    assert paths.runtime_dir() != tmp_path / "missing" / "bcvk"


def test_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert paths.cache_dir() == tmp_path / "bcvk"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert paths.cache_dir() == tmp_path / ".cache" / "bcvk"


def test_ensure_private_dir_tightens_mode(tmp_path: Path) -> None:
    target = tmp_path / "state"
    target.mkdir(mode=0o755)
    target.chmod(0o755)
    paths.ensure_private_dir(target)
    assert target.stat().st_mode & 0o777 == 0o700


def test_ensure_private_dir_refuses_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "state").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BcvkError, match="not a directory owned"):
        paths.ensure_private_dir(tmp_path / "state")


def test_write_atomic_sets_the_mode_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "wrapper"
    target.write_text("old")
    paths.write_atomic(target, "#!/bin/sh\n", 0o700)
    assert target.read_text() == "#!/bin/sh\n"
    assert oct(target.stat().st_mode & 0o777) == "0o700"
    assert [p.name for p in tmp_path.iterdir()] == ["wrapper"]


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "record"
    target.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        paths.write_atomic(target, "\udcff")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["record"]


def test_removable_locks_leave_no_file_and_still_exclude(tmp_path: Path) -> None:
    import threading

    lock = tmp_path / "x.lock"
    order: list[str] = []
    entered = threading.Event()

    def second() -> None:
        entered.wait()
        with paths.locked(lock, remove=True):
            order.append("second")

    thread = threading.Thread(target=second)
    with paths.locked(lock, remove=True) as held:
        assert held
        thread.start()
        entered.set()
        # The waiter opened the file that is about to be deleted: when this
        # block ends it must lock a fresh file, not run alongside a third.
        with paths.locked(lock, blocking=False, remove=True) as busy:
            assert busy is False
        order.append("first")
    thread.join(timeout=10)
    assert order == ["first", "second"]
    assert not lock.exists()


def test_one_at_a_time_uses_the_runtime_dir_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    with paths.one_at_a_time("to-disk\0/x/y.raw", "waiting"):
        assert len(list((tmp_path / "bcvk" / "locks").iterdir())) == 1
    assert list((tmp_path / "bcvk" / "locks").iterdir()) == []


@pytest.mark.parametrize(("text", "message"), [("~\0", "NUL"), ("~no-such-user-x/y", "expand")])
def test_user_paths_that_cannot_be(text: str, message: str) -> None:
    from bcvk.errors import UsageError

    with pytest.raises(UsageError, match=message):
        paths.user_path(text, "--flag")
