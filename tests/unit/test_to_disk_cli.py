"""to-disk's command line with a scripted podman: errors, refusals, dry runs."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from bcvk.__main__ import main
from bcvk.to_disk import DiskFormat, Options, options, output
from tests import schemas
from tests.conftest import FakeBin

REF = "localhost/test/bootc:1"
PLAIN = "localhost/test/app:1"
DIGEST = "sha256:" + "12" * 32


@pytest.fixture
def fake_podman(fake_bin: FakeBin) -> FakeBin:
    images = {
        REF: {"Id": "a" * 64, "Digest": DIGEST, "Size": 400 << 20,
              "Labels": {"containers.bootc": "1"}, "Architecture": "amd64"},
        PLAIN: {"Id": "b" * 64, "Digest": "sha256:" + "34" * 32, "Size": 1 << 20,
                "Labels": {}, "Architecture": "amd64"},
    }  # fmt: skip
    fake_bin.add(
        "podman",
        textwrap.dedent(
            f"""\
            images = json.loads({json.dumps(images)!r})
            if args[:2] == ["image", "inspect"]:
                ref = args[-1]
                if ref not in images:
                    print(f"Error: {{ref}}: image not known", file=sys.stderr)
                    sys.exit(125)
                print(json.dumps([images[ref]]))
                sys.exit(0)
            print("unexpected podman call: " + " ".join(args), file=sys.stderr)
            sys.exit(99)
            """
        ),
        python=True,
    )
    return fake_bin


def bcvk(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["to-disk", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_missing_image(
    fake_podman: FakeBin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = bcvk(capsys, "localhost/nope:1", str(tmp_path / "x.raw"))
    assert code == 1
    assert "image localhost/nope:1 is not in local storage" in err
    assert out == ""


def test_non_bootc_image(
    fake_podman: FakeBin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = bcvk(capsys, PLAIN, str(tmp_path / "x.raw"))
    assert code == 1
    assert "is not a bootc image" in err
    assert "hint:" in err
    assert list(tmp_path.glob("x.raw*")) == []


def test_output_directory_missing(
    fake_podman: FakeBin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = bcvk(capsys, REF, str(tmp_path / "no" / "x.raw"))
    assert code == 1
    assert "does not exist" in err


def test_refuses_to_overwrite_a_foreign_file(
    fake_podman: FakeBin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "precious.qcow2"
    target.write_text("user data")
    for extra in ([], ["--dry-run"]):
        code, _, err = bcvk(capsys, REF, str(target), *extra)
        assert code == 1
        assert "refusing to overwrite" in err
        assert "--force" in err
    assert target.read_text() == "user data"


def test_dry_run_missing_output(
    fake_podman: FakeBin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = bcvk(capsys, REF, str(tmp_path / "x.qcow2"), "--dry-run")
    assert (code, out) == (0, "would-regenerate\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake-bin", "fake-bin.log"]


def _cached(tmp_path: Path, opts: Options, fmt: DiskFormat = DiskFormat.qcow2) -> Path:
    target = tmp_path / "x.qcow2"
    target.write_text("disk")
    key = options.cache_key(REF, DIGEST, fmt, 4 << 30, opts)
    os.setxattr(target, output.XATTR_HASH, options.cache_hash(key).encode())
    return target


def test_dry_run_reuse_and_regenerate(
    fake_podman: FakeBin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = _cached(tmp_path, Options(kargs=("console=ttyS0",)))
    before = target.stat()
    code, out, _ = bcvk(capsys, REF, str(target), "--karg", "console=ttyS0", "--dry-run")
    assert (code, out) == (0, "would-reuse\n")
    code, out, _ = bcvk(capsys, REF, str(target), "--karg", "quiet", "--dry-run")
    assert (code, out) == (0, "would-regenerate\n")
    code, out, _ = bcvk(
        capsys, REF, str(target), "--karg", "console=ttyS0", "--dry-run", "--format", "raw"
    )
    assert out == "would-regenerate\n"
    after = target.stat()
    assert (before.st_mtime_ns, before.st_size) == (after.st_mtime_ns, after.st_size)
    assert target.read_text() == "disk"


def test_reuse_prints_the_upstream_message(
    fake_podman: FakeBin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = _cached(tmp_path, Options())
    code, out, err = bcvk(capsys, REF, str(target))
    assert code == 0
    assert f"Reusing existing cached disk image at: {target}" in err
    code, out, _ = bcvk(capsys, REF, str(target), "--json")
    assert schemas.check("to-disk", json.loads(out))["action"] == "reused"
    # reusing needs nothing but an inspect: no mount, no unshare
    assert all(call[:2] == ["image", "inspect"] for call in fake_podman.calls("podman"))


def test_containers_storage_prefix_hits_the_same_cache(
    fake_podman: FakeBin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = _cached(tmp_path, Options())
    code, out, _ = bcvk(capsys, "containers-storage:" + REF, str(target), "--dry-run")
    assert out == "would-reuse\n"


def test_bad_sizes_are_usage_errors(
    fake_podman: FakeBin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = bcvk(capsys, REF, str(tmp_path / "x.raw"), "--disk-size", "lots")
    assert code == 2
    assert "invalid --disk-size 'lots'" in err


def test_bios_refused_before_any_work(
    fake_podman: FakeBin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "x.raw")
    code, _, err = bcvk(capsys, REF, out, "--firmware", "bios", "--installer", "native")
    assert code == 2
    assert "--firmware bios is not supported by the native installer" in err
    assert fake_podman.calls() == []


def test_unknown_format_flag(
    fake_podman: FakeBin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = bcvk(capsys, REF, str(tmp_path / "x"), "--format", "iso")
    assert code == 2
    assert "'iso' is not one of" in err


def test_help_lists_to_disk(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "to-disk" in capsys.readouterr().out
