"""Every parser the CLI uses, over arbitrary text: a typed value or bcvk's own error.

Property-based (hypothesis): whatever a user types, a parser returns its
value or raises ``UsageError``/``BcvkError`` (one line and a hint at the
boundary), never another exception, which would be a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bcvk import values
from bcvk.ephemeral import options as ephemeral_options
from bcvk.errors import BcvkError
from bcvk.guest import logdir, mounts
from bcvk.host import podman
from bcvk.libvirt.uri import UriInfo, parse_uri
from bcvk.to_disk import DiskFormat, Filesystem

# Text a user may type: printable and not, with the characters parsers split on.
TEXT = st.text(
    alphabet=st.characters(codec="utf-8") | st.sampled_from(":=,/~ \n\0"),
    max_size=80,
)
# derandomize: CI explores the same examples every run (a failure reproduces);
# database=None: no .hypothesis/ directory is left in the checkout.
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
    database=None,
)


def typed_or_usage_error(parse: Callable[[str], object], text: str) -> object:
    """PARSE's value, or None when it refused TEXT with a one-line bcvk error."""
    error: BcvkError | None = None
    try:
        return parse(text)
    except BcvkError as exc:
        error = exc
    assert error.message, "an error without a message"
    assert "\n" not in error.message.strip() or "\n" in text, error.message
    return None


PARSERS: dict[str, Callable[[str], object]] = {
    "size": lambda t: values.parse_size(t, what="--disk-size"),
    "memory": values.parse_memory,
    "vcpus": values.parse_vcpus,
    "itype": values.parse_itype,
    "port": values.PortForward.parse,
    "timeout": values.parse_timeout,
    "vm name": values.validate_vm_name,
    "label": values.validate_label,
    "user": values.validate_user,
    "karg": values.parse_karg,
    "image reference": podman.validate_reference,
    "log dir": logdir.parse_log_dir,
    "disk file": ephemeral_options.parse_disk,
    "named bind": lambda t: mounts.parse_named(t, readonly=False),
    "bind at": lambda t: mounts.parse_at(t, mounts.ShareKind.bind, local=False),
    "volume": lambda t: mounts.parse_at(t, mounts.ShareKind.volume, local=False),
    "firmware": lambda t: values.parse_choice(values.Firmware, t, "--firmware"),
    "format": lambda t: values.parse_choice(DiskFormat, t, "--format"),
    "filesystem": lambda t: values.parse_choice(Filesystem, t, "--filesystem"),
}


@pytest.mark.parametrize("name", sorted(PARSERS))
@SETTINGS
@given(text=TEXT)
def test_parsers_return_a_value_or_a_usage_error(name: str, text: str) -> None:
    typed_or_usage_error(PARSERS[name], text)


@SETTINGS
@given(number=st.integers(min_value=0, max_value=10**30), unit=st.sampled_from(["", "M", "G", "T"]))
def test_sizes_are_exact_integers_within_bounds(number: int, unit: str) -> None:
    result = typed_or_usage_error(lambda t: values.parse_size(t), f"{number}{unit}")
    if result is not None:
        assert isinstance(result, int)
        assert 0 < result <= values.MAX_SIZE


@SETTINGS
@given(host=st.integers(-5, 70000), guest=st.integers(-5, 70000))
def test_ports_in_range_parse_and_others_are_refused(host: int, guest: int) -> None:
    result = typed_or_usage_error(values.PortForward.parse, f"{host}:{guest}")
    valid = 1 <= host <= 65535 and 1 <= guest <= 65535
    assert (result == values.PortForward(host, guest)) if valid else result is None


@SETTINGS
@given(text=TEXT)
def test_names_that_pass_are_safe_as_file_names_and_argv(text: str) -> None:
    for validate in (values.validate_vm_name, values.validate_user, values.validate_label):
        if typed_or_usage_error(validate, text) is not None:
            assert not text.startswith("-")
            assert "/" not in text or validate is values.validate_label
            assert all(c.isprintable() and not c.isspace() for c in text)


@SETTINGS
@given(text=TEXT)
def test_libvirt_uris_never_crash_the_parser(text: str) -> None:
    info = typed_or_usage_error(parse_uri, text)
    assert info is None or isinstance(info, UriInfo)


def test_real_directories_bind(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    share = mounts.parse_named(f"{tmp_path / 'd'}:name", readonly=True)
    assert (share.target, share.readonly) == ("/run/virtiofs-mnt-name", True)
