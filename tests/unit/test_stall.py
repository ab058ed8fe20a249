"""bcvk.guest.stall: a console that stopped in the kernel's boot, and only that."""

from __future__ import annotations

from pathlib import Path

import pytest

from bcvk.ephemeral import options
from bcvk.errors import UsageError
from bcvk.guest import stall
from tests.conftest import Cli

START = "[    0.000000] Linux version 6.1.0-40-amd64 (debian-kernel@lists.debian.org)\n"
KERNEL = (
    "[    0.942724] NET: Registered PF_INET protocol family\n"
    "[    0.942797] IP idents hash table entries: 32768 (order: 6, 262144 bytes, linear)\n"
)
INIT = "[    2.104001] Run /init as init process\n"


def console(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "console.txt"
    path.write_bytes(text.encode())
    return path


def append(path: Path, text: str) -> None:
    with path.open("ab") as f:
        f.write(text.encode())


def test_a_silent_kernel_is_reported_with_its_last_line(tmp_path: Path) -> None:
    watch = stall.Watch(console(tmp_path, KERNEL), 60, armed=True, clock=0)
    watch.check(now=1)  # reads the console: it grew
    watch.check(now=60)
    with pytest.raises(stall.KernelStalled) as raised:
        watch.check(now=61)
    assert "printed nothing for 60s and never ran init" in raised.value.message
    assert raised.value.message.endswith(
        "IP idents hash table entries: 32768 (order: 6, 262144 bytes, linear)"
    )
    assert raised.value.hint is not None
    assert stall.LIMIT_ENV in raised.value.hint


def test_growth_restarts_the_clock(tmp_path: Path) -> None:
    path = console(tmp_path, KERNEL)
    watch = stall.Watch(path, 60, armed=True, clock=0)
    watch.check(now=1)
    append(path, "[    1.2] TCP established hash table entries: 16384\n")
    watch.check(now=59)
    watch.check(now=118)  # 59 s after the last growth
    with pytest.raises(stall.KernelStalled):
        watch.check(now=119)


def test_after_init_silence_means_nothing(tmp_path: Path) -> None:
    path = console(tmp_path, KERNEL + INIT)
    watch = stall.Watch(path, 60, armed=True, clock=0)
    watch.check(now=1)
    # A kernel message after init (a late driver) is no reason either.
    append(path, "[   40.1] virtio_net virtio0 enp0s2: renamed from eth0\n")
    watch.check(now=2)
    watch.check(now=10_000)
    assert watch.init_ran


def test_init_under_another_name_and_the_freeing_line_count(tmp_path: Path) -> None:
    for line in ("[ 3.1] Run /sbin/init as init process", "[ 2.0] Freeing unused kernel image"):
        watch = stall.Watch(console(tmp_path, KERNEL + line + "\n"), 60, armed=True, clock=0)
        watch.check(now=1)
        watch.check(now=1000)
        assert watch.init_ran


def test_a_last_line_that_is_not_the_kernels_is_not_judged(tmp_path: Path) -> None:
    # systemd's status lines (with `quiet` the kernel says nothing), firmware text.
    for text in ("[  OK  ] Reached target basic.target\n", "SeaBIOS (version 1.16.2)\n", ""):
        watch = stall.Watch(console(tmp_path, text), 60, armed=True, clock=0)
        watch.check(now=1)
        watch.check(now=1000)


def test_partial_lines_escape_codes_and_carriage_returns(tmp_path: Path) -> None:
    path = console(tmp_path, "[    0.5] Trying to unpack rootfs image as init")
    watch = stall.Watch(path, 60, armed=True, clock=0)
    watch.check(now=1)
    assert watch.last_line == ""  # not a line yet
    append(path, "ramfs...\r\n\x1b[0m[    1.0] Run /init as init process\r\n")
    watch.check(now=2)
    assert watch.last_line == "[    1.0] Run /init as init process"
    assert watch.init_ran


def test_a_missing_console_is_silence_without_a_kernel_line(tmp_path: Path) -> None:
    watch = stall.Watch(tmp_path / "absent.txt", 60, armed=True, clock=0)
    watch.check(now=1000)


@pytest.mark.parametrize(
    ("cmdline", "armed"),
    [
        ("console=ttyS0 root=virtiofs:rootfs ro panic=-1", True),
        ("console=ttyS0 ro quiet", False),
        ("console=ttyS0 loglevel=3", False),
        ("console=ttyS0 quietly=1", True),
    ],
)
def test_the_watch_needs_the_kernels_messages(cmdline: str, armed: bool) -> None:
    assert stall.armed(cmdline) is armed
    assert (stall.watch(Path("c"), cmdline, 60) is not None) is armed


def test_no_watch_with_a_zero_limit() -> None:
    assert stall.watch(Path("c"), "console=ttyS0", 0) is None
    assert stall.follow(Path("c"), 0) is None


@pytest.mark.parametrize(
    ("cmdline", "armed"),
    [("BOOT_IMAGE=/vmlinuz console=ttyS0 ro", True), ("console=ttyS0 quiet splash", False)],
)
def test_without_a_known_command_line_the_kernels_own_line_decides(
    tmp_path: Path, cmdline: str, armed: bool
) -> None:
    watch = stall.watch(console(tmp_path, ""), None, 60)
    assert watch is not None
    watch.clock = 0
    watch.check(now=1000)  # nothing yet: undecided
    undecided = watch.armed
    assert undecided is None
    append(watch.path, START + f"[    0.0] Kernel command line: {cmdline}\n" + KERNEL)
    watch.check(now=1001)
    assert watch.armed is armed
    if armed:
        with pytest.raises(stall.KernelStalled):
            watch.check(now=1061)
    else:
        watch.check(now=1061)


def test_follow_reads_only_this_boots_part_of_an_appended_log(tmp_path: Path) -> None:
    # The earlier boot ran init; this one stops in the kernel.
    path = console(
        tmp_path, START + "[ 0.0] Kernel command line: ro\n" + KERNEL + INIT + "login:\n"
    )
    watch = stall.follow(path, 60)
    assert watch is not None
    watch.clock = 0
    append(path, START + "[ 0.0] Kernel command line: console=ttyS0\n" + KERNEL)
    watch.check(now=1)
    assert not watch.init_ran
    with pytest.raises(stall.KernelStalled):
        watch.check(now=61)


@pytest.mark.parametrize(("raw", "seconds"), [("", 120.0), ("300", 300.0), (" 0 ", 0.0)])
def test_the_limit_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, raw: str, seconds: float
) -> None:
    monkeypatch.setenv(stall.LIMIT_ENV, raw)
    assert stall.limit() == seconds
    assert options.make_options("localhost/x:1").boot_stall == seconds


@pytest.mark.parametrize("raw", ["abc", "-1", "inf", "nan", "5s"])
def test_a_bad_limit_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(stall.LIMIT_ENV, raw)
    with pytest.raises(UsageError) as raised:
        options.make_options("localhost/x:1")
    assert stall.LIMIT_ENV in raised.value.message
    assert raised.value.hint


def test_an_appended_log_is_judged_by_its_last_boot(tmp_path: Path) -> None:
    # A log libvirt appends to: the earlier boot ran init, the newest one stops.
    older = START + "[ 0.1] Kernel command line: ro\n" + KERNEL + INIT + "login:\n"
    watch = stall.watch(console(tmp_path, older), None, 60)
    assert watch is not None
    watch.clock = 0
    watch.check(now=1)
    earlier_ran = watch.init_ran
    assert earlier_ran
    append(watch.path, START + "[ 0.1] Kernel command line: ro\n" + KERNEL)
    watch.check(now=2)
    assert not watch.init_ran
    with pytest.raises(stall.KernelStalled):
        watch.check(now=62)


@pytest.mark.parametrize(
    "argv",
    [
        ("ephemeral", "run-ssh", "localhost/bcvk/none:1", "--", "true"),
        ("libvirt", "-c", "test:///default", "run", "localhost/bcvk/none:1"),
    ],
)
def test_a_bad_limit_is_one_error_line_before_anything_starts(
    cli: Cli, argv: tuple[str, ...]
) -> None:
    result = cli(*argv, env={stall.LIMIT_ENV: "soon"})
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: ${stall.LIMIT_ENV} must be a number of seconds, not 'soon'"]
    assert "hint:" in result.stderr
    assert "Traceback" not in result.stderr
