from __future__ import annotations

from datetime import UTC, datetime

import pytest

from bcvk.cli.output import age
from bcvk.errors import UsageError
from bcvk.host.podman import split_reference, validate_reference
from bcvk.values import GIB, MIB, format_size, parse_size


@pytest.mark.parametrize(
    ("text", "unit", "expected"),
    [
        ("4G", "", 4 * GIB),
        ("4g", "", 4 * GIB),
        ("512M", "", 512 * MIB),
        ("2GiB", "", 2 * GIB),
        ("20GB", "", 20 * GIB),
        ("1.5G", "", int(1.5 * GIB)),
        ("2048", "m", 2048 * MIB),
        ("4096", "", 4096),
        (" 1T ", "", 1024 * GIB),
    ],
)
def test_parse_size(text: str, unit: str, expected: int) -> None:
    assert parse_size(text, default_unit=unit) == expected


@pytest.mark.parametrize("text", ["", "G", "-1G", "0", "4X", "four", "1G; rm -rf /"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_size(text, what="--memory")
    assert "--memory" in info.value.message or "positive" in info.value.message


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(3 * GIB) == "3.0 GiB"


@pytest.mark.parametrize(
    ("name", "repo", "tag"),
    [
        ("localhost/bcvk/debian-bootc:12", "localhost/bcvk/debian-bootc", "12"),
        ("quay.io/fedora/fedora-bootc", "quay.io/fedora/fedora-bootc", "latest"),
        ("127.0.0.1:5000/x/y:1.0", "127.0.0.1:5000/x/y", "1.0"),
        ("127.0.0.1:5000/x/y", "127.0.0.1:5000/x/y", "latest"),
        ("quay.io/a/b@sha256:abcd", "quay.io/a/b", "@sha256:abcd"),
    ],
)
def test_split_reference(name: str, repo: str, tag: str) -> None:
    assert split_reference(name) == (repo, tag)


@pytest.mark.parametrize("ref", ["", "-rm", "a b", "x;y", "$(id)", "a\nb", "/abs"])
def test_validate_reference_rejects(ref: str) -> None:
    with pytest.raises(UsageError):
        validate_reference(ref)


def test_age() -> None:
    now = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    assert age("2026-11-21T09:00:00Z", now) == "3 hours ago"
    assert age("2026-11-21T11:59:58.123456789Z", now) == "just now"
    assert age(int(datetime(2026, 11, 20, 12, 0, tzinfo=UTC).timestamp()), now) == "1 day ago"
    assert age("not a time", now) == "not a time"
