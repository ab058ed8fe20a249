"""Shared test machinery.

Two tiers: `tests/unit` is hermetic (fakes only), `tests/integration` drives
real podman, QEMU, libvirtd and ssh.  Integration tests skip only when a
capability probe says the host lacks something; under CI (``CI`` set) a skip
is a failure, because CI installs every capability.
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO_IMAGE = "localhost/bcvk/debian-bootc:12"
# Variants of the demo image (scripts/build-images.sh)
INITRAMFS_TOOLS_IMAGE = "localhost/bcvk/debian-bootc-initramfs-tools:12"
PODMAN_IMAGE = "localhost/bcvk/debian-bootc-podman:12"
UKI_IMAGE = "localhost/bcvk/debian-bootc-uki:12"
FIXTURES = {
    "not-bootc": "localhost/bcvk/fixture-not-bootc:latest",
    "unlabelled": "localhost/bcvk/fixture-unlabelled:latest",
    "no-kernel": "localhost/bcvk/fixture-no-kernel:latest",
    "two-kernels": "localhost/bcvk/fixture-two-kernels:latest",
}
TEST_USER = "bcvk-test"
# Every process this test run starts inherits this marker, so leak checks
# only count our own QEMU/virtiofsd and not those of a developer's VMs.
RUN_TOKEN = f"BCVK_TEST_RUN={uuid.uuid4().hex}"
os.environ["BCVK_TEST_RUN"] = RUN_TOKEN.split("=", 1)[1]

_module_times: dict[str, float] = defaultdict(float)

# A suite started in the background by a non-interactive shell (`nohup
# make test &`, some CI runners) inherits SIGINT ignored, and so would every
# bcvk it starts: the Ctrl-C tests would test nothing.  A handler (unlike
# SIG_IGN) is reset to the default across exec.
signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--regenerate-golden", action="store_true", help="rewrite golden files from the code"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/integration/" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    _module_times[item.nodeid.split("::")[0]] += report.duration
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = (
            f"skipped under CI, where every capability is installed: {report.longrepr}"
        )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _module_times:
        return
    terminalreporter.section("time per test module")
    for module, seconds in sorted(_module_times.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{seconds:8.1f}s  {module}")


# ---------------------------------------------------------------- helpers


# The environment under test is the one running pytest: its console scripts
# sit beside its interpreter, whatever that environment is called.
BIN_DIR = Path(sys.executable).parent


def bcvk_bin() -> str:
    return str(BIN_DIR / "bcvk") if (BIN_DIR / "bcvk").exists() else shutil.which("bcvk") or "bcvk"


def bcvk_argv(
    args: Sequence[str], env: dict[str, str] | None, user: str | None
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run the real `bcvk` ARGS (as USER, if given)."""
    argv: list[str] = [bcvk_bin(), *args]
    if user is not None:
        # as_user starts from an empty environment: ENV goes on the command line.
        return as_user(user, argv, env or {}), dict(os.environ)
    return argv, {**os.environ, **(env or {})}


def bcvk(
    *args: str,
    check: bool = False,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    user: str | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the real `bcvk` CLI (optionally as another user) and capture its output.

    The one way tests run the CLI as a child process (``bcvk_popen`` for the
    ones that signal it).
    """
    argv, full_env = bcvk_argv(args, env, user)
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        input=input,
        check=False,
        cwd=ROOT,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} failed ({result.returncode}):\n{result.stderr}")
    return result


class Cli(Protocol):
    def __call__(
        self,
        *args: str,
        check: bool = ...,
        env: dict[str, str] | None = ...,
        input: str | None = ...,
    ) -> subprocess.CompletedProcess[str]: ...


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    """Run `bcvk ARGS` in this process, through the same ``main`` and error
    boundary as the console script: the hermetic tier's way to drive the CLI.

    A child process costs a quarter of a second of imports each time, which
    over a few hundred calls was most of the hermetic tier's run time; the
    install test and the integration tier still run the real console script.
    """
    from bcvk.__main__ import main

    def run(
        *args: str,
        check: bool = False,
        env: dict[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        handlers = {
            sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        }
        capsys.readouterr()
        with monkeypatch.context() as patch:
            for key, value in (env or {}).items():
                patch.setenv(key, value)
            patch.setattr(sys, "stdin", io.StringIO(input or ""))
            try:
                code = main(list(args))
            finally:
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)
        out, err = capsys.readouterr()
        result = subprocess.CompletedProcess(["bcvk", *args], code, out, err)
        if check and code != 0:
            raise AssertionError(f"bcvk {' '.join(args)} failed ({code}):\n{err}")
        return result

    return run


def bcvk_popen(
    *args: str, env: dict[str, str] | None = None, user: str | None = None
) -> subprocess.Popen[str]:
    argv, full_env = bcvk_argv(args, env, user)
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        cwd=ROOT,
    )


@functools.cache
def user_bin_dir(user: str) -> Path:
    """Where USER finds bcvk: the environment under test, or the copy made for
    it by scripts/setup-rootless-venv.sh when the checkout is private."""
    own = BIN_DIR
    probe = ["runuser", "-u", user, "--", "test", "-r", str(ROOT / "bcvk" / "__init__.py")]
    if subprocess.run(probe, check=False).returncode == 0:
        return own
    return Path("/opt/bcvk/test-venv/bin")


def as_user(user: str, argv: Sequence[str], env: dict[str, str] | None = None) -> list[str]:
    """ARGV run as USER with a login-like environment (plus ENV) but no logind session."""
    home = f"/home/{user}"
    bindir = user_bin_dir(user)
    argv = list(argv)
    if argv and argv[0] == bcvk_bin():
        argv[0] = str(bindir / "bcvk")
    return [
        "runuser", "-u", user, "--",
        "env", "-i", f"HOME={home}", f"USER={user}", f"LOGNAME={user}",
        f"PATH={bindir}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "LANG=C.UTF-8",
        RUN_TOKEN,
        *(f"{k}={v}" for k, v in (env or {}).items()),
        *argv,
    ]  # fmt: skip


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def image_exists(ref: str, user: str | None = None) -> bool:
    if not have("podman"):
        return False
    argv = ["podman", "image", "exists", ref]
    if user:
        argv = as_user(user, argv)
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0


def user_exists(user: str) -> bool:
    return subprocess.run(["id", user], capture_output=True, check=False).returncode == 0


def stray_processes(names: Sequence[str] = ("qemu-system", "virtiofsd")) -> list[str]:
    """Command lines of this test run's processes whose argv[0] contains one of NAMES."""
    found: list[str] = []
    token = RUN_TOKEN.encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if token not in (proc / "environ").read_bytes().split(b"\0"):
                continue
        except OSError:
            continue
        # The virtiofsd wrapper runs it through the dynamic loader, so any
        # argv word naming the program counts, not only argv[0].
        words = [Path(w.decode(errors="replace")).name for w in cmdline if w]
        if any(n in w for n in names for w in words[:3]):
            found.append(b" ".join(cmdline).decode(errors="replace"))
    return found


def podman_mounts(user: str | None = None) -> list[str]:
    """IDs of the images podman has mounted (in USER's store if given)."""
    argv = ["podman", "image", "mount", "--format", "json"]
    if user:
        argv = as_user(user, ["podman", "unshare", *argv])
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return [
        str(entry.get("id", entry.get("ID", ""))) for entry in json.loads(result.stdout or "[]")
    ]


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def golden(request: pytest.FixtureRequest) -> Callable[[str, str], None]:
    """Compare text with tests/data/golden/NAME (rewrite it with --regenerate-golden)."""
    regenerate = bool(request.config.getoption("--regenerate-golden"))

    def check(name: str, actual: str) -> None:
        path = ROOT / "tests" / "data" / "golden" / name
        if regenerate or not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(actual)
            if not regenerate:
                pytest.fail(f"golden file {name} was missing and has been written; rerun")
        assert actual == path.read_text(), f"differs from golden file {path}"

    return check


@pytest.fixture
def demo_image() -> str:
    if not image_exists(DEMO_IMAGE):
        pytest.skip(f"{DEMO_IMAGE} not built (run `make images`)")
    return DEMO_IMAGE


@pytest.fixture
def fixture_image() -> dict[str, str]:
    missing = [ref for ref in FIXTURES.values() if not image_exists(ref)]
    if missing:
        pytest.skip(f"fixture images missing: {missing} (run `make images`)")
    return dict(FIXTURES)


@pytest.fixture
def rootless_user() -> str:
    if os.geteuid() != 0:
        pytest.skip("switching to the test user needs root")
    if not user_exists(TEST_USER) or not image_exists(DEMO_IMAGE, TEST_USER):
        pytest.skip(f"user {TEST_USER} or its images missing (run `make images`)")
    return TEST_USER


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fail the test if it leaves a QEMU/virtiofsd process or an image mount behind."""
    before_procs = set(stray_processes())
    before_mounts = set(podman_mounts()) if have("podman") else set()
    yield
    deadline = time.monotonic() + 10
    while True:
        leaked = set(stray_processes()) - before_procs
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not leaked, f"processes left behind: {leaked}"
    if have("podman"):
        assert set(podman_mounts()) <= before_mounts, "image mounts left behind"


class FakeBin:
    """Scripted programs first on PATH, each call's argv recorded (osbuild's mock_command).

    ``add(NAME, BODY)`` writes NAME: it appends its argv to a log, then runs
    BODY (with SHELL, /bin/sh by default, or Python with ``python=True``,
    where ``args`` is ``sys.argv[1:]``).  ``calls(NAME)`` returns the recorded argvs in order.
    """

    _FIELD, _RECORD = "\x1f", "\x1e"

    def __init__(self, directory: Path, log: Path) -> None:
        self.directory = directory
        self.log = log

    def add(
        self, name: str, body: str = "", *, python: bool = False, shell: str = "/bin/sh"
    ) -> Path:
        path = self.directory / name
        if python:
            head = (
                "#!/usr/bin/env python3\nimport json, os, sys\nargs = sys.argv[1:]\n"
                f"with open({os.fspath(self.log)!r}, 'a') as _log:\n"
                f"    _log.write({self._FIELD!r}.join([{name!r}, *args]) + {self._RECORD!r})\n"
            )
        else:
            head = (
                f"#!{shell}\n"
                f"printf '%s\\037' {name} \"$@\" >> {os.fspath(self.log)!r}\n"
                f"printf '\\036' >> {os.fspath(self.log)!r}\n"
            )
        path.write_text(head + body + "\n")
        path.chmod(0o755)
        return path

    def calls(self, name: str | None = None) -> list[list[str]]:
        if not self.log.exists():
            return []
        found = []
        for record in self.log.read_text().split(self._RECORD):
            if not record:
                continue
            fields = record.split(self._FIELD)
            if fields and fields[-1] == "":
                fields = fields[:-1]
            if name is None or fields[0] == name:
                found.append(fields[1:] if name is not None else fields)
        return found


@pytest.fixture
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeBin:
    """An empty FakeBin directory first on PATH (nothing real runs through it)."""
    directory = tmp_path / "fake-bin"
    directory.mkdir()
    monkeypatch.setenv("PATH", f"{directory}:{os.environ['PATH']}")
    monkeypatch.delenv("BCVK_VIRTIOFSD", raising=False)
    monkeypatch.delenv("VIRTIOFSD_BIN", raising=False)
    return FakeBin(directory, tmp_path / "fake-bin.log")


@pytest.fixture
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Private XDG runtime and cache dirs so tests never see each other's state."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path
