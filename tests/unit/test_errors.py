from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from bcvk import log
from bcvk.__main__ import main, report
from bcvk.errors import BcvkError, CommandError


def test_command_error_carries_argv_status_and_tail() -> None:
    stderr = "\n".join(f"line {i}" for i in range(50)) + "\nfatal: it broke\n"
    err = CommandError(["podman", "image", "mount", "x y"], 125, stderr)
    assert err.argv == ["podman", "image", "mount", "x y"]
    assert err.returncode == 125
    assert err.stderr_tail.splitlines()[-1] == "fatal: it broke"
    assert len(err.stderr_tail.splitlines()) == 20
    assert err.message == "podman failed with exit status 125: fatal: it broke"
    assert err.command_line == "podman image mount 'x y'"


def test_command_error_signal() -> None:
    assert "killed by signal 9" in CommandError(["qemu"], -9).message


def _capture(fmt: str) -> io.StringIO:
    stream = io.StringIO()
    log.setup(log_format=fmt, stream=stream)
    return stream


def test_report_renders_one_error_line_and_a_hint() -> None:
    stream = _capture("text")
    report(BcvkError("image x has no kernel", hint="build it with a kernel"))
    assert stream.getvalue().splitlines() == [
        "error: image x has no kernel",
        "hint: build it with a kernel",
    ]


def test_report_json_lines() -> None:
    stream = _capture("json")
    report(BcvkError("boom", hint="do this"))
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["level"] == "error"
    assert lines[0]["message"] == "boom"
    assert lines[0]["hint"] == "do this"
    assert lines[1]["message"] == "hint: do this"


def test_no_colour_off_a_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = _capture("text")
    log.logger.warning("careful")
    assert "\033[" not in stream.getvalue()


def test_no_color_env_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("TERM", "xterm")
    assert log.use_colour(Tty())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not log.use_colour(Tty())


def test_main_turns_bcvk_error_into_exit_status(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    code = main(["images", "list"])
    err = capsys.readouterr().err
    assert code == 1
    assert "error: podman not found" in err
    assert "hint: install it: apt-get install podman" in err
    assert "Traceback" not in err
    logging.getLogger("bcvk").handlers.clear()


def test_main_usage_error_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["images", "inspect"]) == 2
    assert "Missing argument 'IMAGE'" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from bcvk import __version__

    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_every_raised_bcvk_error_carries_a_hint() -> None:
    """The boundary prints `error:` then `hint:`; a raise without one is a gap.

    Scans bcvk's source for ``raise SomeError(...)`` of bcvk's own errors.
    LibvirtError and CommandError supply a default hint themselves.
    """
    import ast

    import bcvk
    from bcvk import errors

    own = {name for name, value in vars(errors).items() if isinstance(value, type)}
    own |= {"DomainNotFound"}
    defaults = {"LibvirtError", "CommandError"}
    missing = []
    for path in sorted(Path(bcvk.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
                continue
            func = node.exc.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name not in own or name in defaults:
                continue
            if len(node.exc.args) < 2 and "hint" not in {k.arg for k in node.exc.keywords}:
                missing.append(f"{path.name}:{node.lineno} {name}")
    assert missing == []
