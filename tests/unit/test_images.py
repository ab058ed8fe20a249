from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from bcvk.__main__ import main
from bcvk.host.podman import ImageInfo, parse_inspect
from bcvk.image import facts as image_facts
from bcvk.image.facts import TreeFacts
from bcvk.image.inspect import judge, summaries_from_podman
from bcvk.image.tree import Kernel
from tests import schemas
from tests.conftest import FakeBin

from .treebuilder import bootc_tree

INFO = ImageInfo(
    id="a" * 64,
    digest="sha256:" + "b" * 64,
    names=("localhost/x:1",),
    created="2026-11-21T00:00:00Z",
    size=400_000_000,
    architecture="amd64",
    os="linux",
    labels={"containers.bootc": "1"},
)


@pytest.fixture
def facts(tmp_path: Path) -> TreeFacts:
    return image_facts.probe(bootc_tree(tmp_path))


def test_bootable_image_has_no_problems(facts: TreeFacts) -> None:
    assert judge(INFO, facts, "amd64") == ([], [])


def test_missing_label_is_only_a_warning(facts: TreeFacts) -> None:
    problems, warnings = judge(dataclasses.replace(INFO, labels={}), facts, "amd64")
    assert problems == []
    assert warnings == ["image has no containers.bootc=1 label"]


def test_no_kernel_is_refused_as_application_container(facts: TreeFacts) -> None:
    problems, _ = judge(INFO, dataclasses.replace(facts, kernels=[]), "amd64")
    assert len(problems) == 1
    assert "no kernel" in problems[0]
    assert "application container" in problems[0]


def test_two_kernels_named(facts: TreeFacts) -> None:
    two = [Kernel("6.1", "vmlinuz", "/a", "/b"), Kernel("6.2", "vmlinuz", "/c", "/d")]
    problems, _ = judge(INFO, dataclasses.replace(facts, kernels=two), "amd64")
    assert problems == ["found 2 kernels, need exactly one: 6.1 (vmlinuz), 6.2 (vmlinuz)"]


def test_kernel_without_initramfs(facts: TreeFacts) -> None:
    one = [Kernel("6.1", "vmlinuz", "/usr/lib/modules/6.1/vmlinuz", None)]
    problems, _ = judge(INFO, dataclasses.replace(facts, kernels=one), "amd64")
    assert problems == ["kernel 6.1 has no initramfs.img beside its vmlinuz"]


def test_foreign_architecture(facts: TreeFacts) -> None:
    problems, _ = judge(dataclasses.replace(INFO, architecture="arm64"), facts, "amd64")
    assert problems == [
        "image architecture is arm64 but this host is amd64; "
        "cross-architecture emulation is not supported"
    ]


def test_no_init(facts: TreeFacts) -> None:
    problems, _ = judge(INFO, dataclasses.replace(facts, init=None), "amd64")
    assert problems == ["no init system: /sbin/init is missing"]


def test_warnings_for_sshd_and_initramfs(facts: TreeFacts) -> None:
    weak = dataclasses.replace(
        facts,
        sshd_installed=False,
        sshd_enabled=False,
        initramfs={"virtiofs": False, "virtio_blk": True, "ext4": True, "initramfs_tools": True},
    )
    problems, warnings = judge(INFO, weak, "amd64")
    assert problems == []
    joined = "\n".join(warnings)
    assert "sshd is not installed" in joined
    assert "cannot mount virtiofs: ephemeral VMs use --rootfs block" in joined


@pytest.mark.parametrize(
    ("caps", "problem"),
    [
        ({"virtiofs": True, "virtio_blk": True, "ext4": True}, "neither systemd-based"),
        # initramfs-tools cannot mount virtiofs, and this one lacks virtio_blk
        ({"virtiofs": True, "ext4": True, "initramfs_tools": True}, "can mount neither"),
        ({"systemd": True}, "can mount neither virtiofs nor an ext4 disk"),
    ],
)
def test_initramfs_that_cannot_boot_is_a_problem(
    facts: TreeFacts, caps: dict[str, bool], problem: str
) -> None:
    problems, _ = judge(INFO, dataclasses.replace(facts, initramfs=caps), "amd64")
    assert len(problems) == 1
    assert problem in problems[0]


def test_initramfs_tools_with_block_drivers_boots(facts: TreeFacts) -> None:
    caps = {"virtio_blk": True, "ext4": True, "initramfs_tools": True}
    problems, _ = judge(INFO, dataclasses.replace(facts, initramfs=caps), "amd64")
    assert problems == []


def test_summaries_one_row_per_name() -> None:
    entries: list[dict[str, Any]] = [
        {
            "Id": "f" * 64,
            "Names": ["localhost/a:1", "localhost/a:latest"],
            "Digest": "sha256:1",
            "CreatedAt": "2026-11-21T00:00:00Z",
            "Size": 10,
        },
        {"Id": "e" * 64, "Names": None, "Digest": "sha256:2", "Created": 0, "Size": 5},
    ]
    rows = summaries_from_podman(entries)
    assert [(r.repository, r.tag) for r in rows] == [
        ("<none>", "<none>"),
        ("localhost/a", "1"),
        ("localhost/a", "latest"),
    ]
    assert (rows[1].name, rows[1].id, rows[1].created, rows[1].size) == (
        "localhost/a:1", "f" * 64, "2026-11-21T00:00:00Z", 10,
    )  # fmt: skip


def test_parse_inspect_labels_from_config() -> None:
    info = parse_inspect(
        {
            "Id": "x",
            "Digest": "sha256:y",
            "RepoTags": ["a:b"],
            "Size": 3,
            "Architecture": "amd64",
            "Config": {"Labels": {"containers.bootc": "1"}},
        }
    )
    assert info.is_bootc
    assert info.names == ("a:b",)


# A fake `podman` on PATH: answers from canned JSON.
FAKE_PODMAN = """
if args[:1] == ["images"]:
    print(os.environ.get("FAKE_IMAGES", "[]"))
elif args[:2] == ["image", "inspect"]:
    sys.stderr.write("Error: " + args[-1] + ": image not known\\n")
    sys.exit(125)
else:
    sys.exit(0)
"""


@pytest.fixture
def fake_podman(fake_bin: FakeBin) -> FakeBin:
    fake_bin.add("podman", FAKE_PODMAN, python=True)
    return fake_bin


def one_image(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    """The fake podman lists one image, localhost/a:1 of SIZE bytes."""
    image = {"Id": "f" * 64, "Names": ["localhost/a:1"], "Size": size, "Created": 0}
    monkeypatch.setenv("FAKE_IMAGES", json.dumps([image]))


def test_cli_list_json_filters_on_bootc_label(
    fake_podman: FakeBin, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    one_image(monkeypatch, size=1)
    assert main(["images", "list", "--json"]) == 0
    out = schemas.check("images-list", json.loads(capsys.readouterr().out))
    assert out == [{"Id": "f" * 64, "Names": ["localhost/a:1"], "Size": 1, "Created": 0}]
    assert fake_podman.calls("podman") == [
        ["images", "--format", "json", "--filter", "label=containers.bootc=1"]
    ]


def test_cli_list_table(
    fake_podman: FakeBin, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    one_image(monkeypatch, size=2048)
    assert main(["images", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    assert lines[1].split()[:3] == ["localhost/a", "1", "f" * 12]
    assert lines[1].endswith("2.0 KiB")


def test_cli_inspect_missing_image(
    fake_podman: FakeBin, capsys: pytest.CaptureFixture[str]
) -> None:
    from bcvk.__main__ import main

    assert main(["images", "inspect", "localhost/nope:1"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: image localhost/nope:1 is not in local storage"
    assert err[1].startswith("hint: ")


def test_cli_inspect_rejects_bad_reference(capsys: pytest.CaptureFixture[str]) -> None:
    from bcvk.__main__ import main

    assert main(["images", "inspect", "x;rm -rf /"]) == 2
    assert "invalid image reference" in capsys.readouterr().err


def test_an_untagged_image_is_listed_with_empty_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """podman leaves Names out for a dangling image; bcvk's JSON always has it."""
    from bcvk.host import podman as podman_mod
    from bcvk.image import inspect as image_inspect

    entries = [{"Id": "b" * 64, "Names": ["localhost/x:1"]}, {"Id": "a" * 64}]
    monkeypatch.setattr(podman_mod, "list_images", lambda: entries)
    listed = image_inspect.list_bootc_entries()
    assert [e["Names"] for e in listed] == [[], ["localhost/x:1"]]
