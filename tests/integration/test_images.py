"""`bcvk images list|inspect` against the real images built by `make images`."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import schemas
from tests.conftest import DEMO_IMAGE, FIXTURES, bcvk, podman_mounts

pytestmark = pytest.mark.usefixtures("no_leaks")


def inspect_json(image: str, user: str | None = None) -> tuple[int, dict[str, Any], str]:
    result = bcvk("images", "inspect", "--format", "json", image, user=user)
    return result.returncode, json.loads(result.stdout or "{}"), result.stderr


def test_list_json_includes_demo_image(demo_image: str) -> None:
    result = bcvk("images", "list", "--format", "json", check=True)
    rows = schemas.check("images-list", json.loads(result.stdout))
    # a dangling image has no names: podman says null, and so does bcvk
    demo = [r for r in rows if DEMO_IMAGE in (r["Names"] or [])]
    assert len(demo) == 1
    # podman's own keys, as upstream prints them
    assert set(demo[0]) >= {"Names", "Id", "Digest", "Created", "CreatedAt", "Size", "Labels"}
    assert demo[0]["Size"] > 50_000_000
    assert demo[0]["Labels"]["containers.bootc"] == "1"
    # Only bootc-labelled images are listed.
    names = {n for r in rows for n in r["Names"] or []}
    assert FIXTURES["not-bootc"] not in names
    assert FIXTURES["unlabelled"] not in names


def test_list_table_and_upstream_json_alias(demo_image: str) -> None:
    table = bcvk("images", "list", check=True).stdout.splitlines()
    assert table[0].split()[:2] == ["REPOSITORY", "TAG"]
    assert any(line.split()[:2] == ["localhost/bcvk/debian-bootc", "12"] for line in table)
    assert json.loads(bcvk("images", "list", "--json", check=True).stdout)


def test_inspect_demo_image_is_bootable(demo_image: str) -> None:
    code, data, stderr = inspect_json(demo_image)
    assert code == 0, stderr
    assert data["bootable"] is True
    assert data["problems"] == []
    assert data["bootc_label"] is True
    assert data["architecture"] == "amd64"
    assert data["os"] == {
        "id": "debian",
        "version_id": "12",
        "pretty_name": "Debian GNU/Linux 12 (bookworm)",
    }
    kernel = data["kernel"]
    assert isinstance(kernel, dict)
    assert kernel["kind"] == "vmlinuz"
    assert kernel["path"] == f"/usr/lib/modules/{kernel['version']}/vmlinuz"
    assert data["init"] == "systemd"
    assert data["systemd_version"] == 252
    assert data["sshd_enabled"] is True
    assert data["has_bootc"] is False
    assert data["initramfs_generator"] == "dracut"
    caps = data["initramfs_can_mount"]
    assert isinstance(caps, dict)
    for need in ("virtiofs", "virtio_blk", "ext4", "xfs", "btrfs", "overlay", "systemd"):
        assert caps[need] is True, need
    assert str(data["digest"]).startswith("sha256:")


def test_inspect_yaml_and_table(demo_image: str) -> None:
    data = yaml.safe_load(bcvk("images", "inspect", "--format", "yaml", demo_image).stdout)
    assert data["bootable"] is True
    table = bcvk("images", "inspect", demo_image, check=True).stdout
    assert "Bootable:" in table
    assert "Debian GNU/Linux 12" in table


def test_unlabelled_image_boots_with_a_warning(fixture_image: dict[str, str]) -> None:
    code, data, _ = inspect_json(fixture_image["unlabelled"])
    assert code == 0
    assert data["bootable"] is True
    assert data["bootc_label"] is False
    assert "image has no containers.bootc=1 label" in data["warnings"]


@pytest.mark.parametrize(
    ("fixture", "needle"),
    [
        ("not-bootc", "application container"),
        ("no-kernel", "no kernel found"),
        ("two-kernels", "found 2 kernels"),
    ],
)
def test_unbootable_fixtures_are_refused(
    fixture_image: dict[str, str], fixture: str, needle: str
) -> None:
    code, data, stderr = inspect_json(fixture_image[fixture])
    assert code == 1
    assert data["bootable"] is False
    assert any(needle in p for p in data["problems"])
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors
    assert needle in errors[0]


@pytest.fixture
def foreign_image(tmp_path: Path) -> Iterator[str]:
    """A tiny arm64 'bootc' image: kernel and init present, wrong architecture."""
    tree = tmp_path / "tree"
    for rel in (
        "usr/lib/modules/6.1.0-arm64/vmlinuz",
        "usr/lib/modules/6.1.0-arm64/initramfs.img",
        "usr/lib/systemd/systemd",
    ):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("x")
    (tree / "usr/sbin").mkdir(parents=True)
    (tree / "usr/sbin/init").symlink_to("../lib/systemd/systemd")
    (tree / "sbin").symlink_to("usr/sbin")
    tarball = tmp_path / "tree.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.add(tree, arcname=".")
    ref = f"localhost/bcvk/test-foreign-{uuid.uuid4().hex[:8]}:latest"
    subprocess.run(
        ["podman", "import", "--arch", "arm64", "--change", "LABEL containers.bootc=1",
         str(tarball), ref],
        check=True, capture_output=True,
    )  # fmt: skip
    yield ref
    subprocess.run(["podman", "rmi", "-f", ref], check=False, capture_output=True)


def test_foreign_architecture_is_a_problem(foreign_image: str) -> None:
    code, data, stderr = inspect_json(foreign_image)
    assert code == 1
    assert any("architecture is arm64" in p for p in data["problems"])
    assert "cross-architecture" in stderr


def test_missing_image() -> None:
    result = bcvk("images", "inspect", "localhost/bcvk/does-not-exist:1")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0] == "error: image localhost/bcvk/does-not-exist:1 is not in local storage"
    assert lines[1].startswith("hint:")
    assert result.stdout == ""


def test_podman_missing(tmp_path: Path) -> None:
    result = bcvk("images", "list", env={"PATH": str(tmp_path)})
    assert result.returncode == 1
    assert result.stderr.splitlines()[0].startswith("error: podman not found")
    assert "apt-get install podman" in result.stderr


def test_interrupted_inspect_leaves_no_mount(demo_image: str) -> None:
    """SIGTERM mid-inspect takes the Ctrl-C path, which unmounts."""
    before = set(podman_mounts())
    proc = subprocess.Popen(
        [*_bcvk_argv(), "images", "inspect", "--format", "json", demo_image],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # Wait until the image is mounted, then interrupt.
    for _ in range(200):
        if set(podman_mounts()) - before or proc.poll() is not None:
            break
    proc.terminate()
    proc.communicate(timeout=60)
    assert set(podman_mounts()) <= before


def _bcvk_argv() -> list[str]:
    from tests.conftest import bcvk_bin

    return [bcvk_bin()]


def test_rootless_inspect(rootless_user: str) -> None:
    code, data, stderr = inspect_json(DEMO_IMAGE, user=rootless_user)
    assert code == 0, stderr
    assert data["bootable"] is True
    assert data["systemd_version"] == 252
    assert data["sshd_enabled"] is True
    assert podman_mounts(rootless_user) == []
    # And a refusal works the same way without root.
    code, data, _ = inspect_json(FIXTURES["no-kernel"], user=rootless_user)
    assert code == 1
    assert podman_mounts(rootless_user) == []


def test_rootless_list(rootless_user: str) -> None:
    result = bcvk("images", "list", "--format", "json", user=rootless_user)
    assert result.returncode == 0, result.stderr
    assert DEMO_IMAGE in {n for r in json.loads(result.stdout) for n in r["Names"]}
    assert os.geteuid() == 0
