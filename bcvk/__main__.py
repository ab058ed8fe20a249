"""Entry point and the single error boundary.

Expected failures (``BcvkError``) become one ``error:`` line plus a ``hint:``
line and a non-zero exit; a traceback only appears with ``--debug`` or for
real bugs.  SIGTERM and SIGHUP take the same clean-up path as Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

import click

from bcvk.errors import BcvkError, UsageError, os_hint
from bcvk.log import DEBUG, logger


def _interrupt(signum: int, frame: FrameType | None) -> None:
    from bcvk import run

    run.note_interrupt()  # so that one dropped while forking is not lost
    raise KeyboardInterrupt(signal.Signals(signum).name)


def os_error(exc: OSError) -> BcvkError:
    """EXC as the one-line error the boundary prints (the path and the reason)."""
    what = exc.strerror or type(exc).__name__
    path = exc.filename if exc.filename is not None else None
    message = f"{path}: {what}" if path else what
    if exc.filename2 is not None:
        message += f" (and {exc.filename2})"
    return BcvkError(message, hint=os_hint(exc))


def report(exc: BcvkError) -> None:
    # Every error has a hint (a test checks each raise); this is the backstop.
    hint = exc.hint or "rerun with --debug for details"
    logger.error("%s", exc.message, extra={"fields": {"hint": hint}}, exc_info=DEBUG.get())
    logger.info("hint: %s", hint, extra={"fields": {"kind": "hint"}})


def main(
    argv: list[str] | None = None,
    prog_name: str | None = None,
    command: click.Command | None = None,
) -> int:
    """Run COMMAND (default: the `bcvk` root group; `podman-bootc` passes its own)."""
    from bcvk import log
    from bcvk.cli import root

    # Until options are parsed, errors still need a handler.
    log.setup()
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    # Python's own SIGINT handler, with the count; an ignored SIGINT (a
    # shell's background job) stays ignored, as Python leaves it.
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _interrupt)
    if argv is None and command is None and sys.argv[1:] == [] and "LISTEN_FDS" in os.environ:
        # `varlinkctl call exec:bcvk …` and socket units start bcvk with no arguments.
        argv = ["varlink", "serve"]
    try:
        # Without standalone mode click returns ctx.exit()'s code instead of exiting.
        cli = command if command is not None else root
        result = cli.main(args=argv, prog_name=prog_name or "bcvk", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.UsageError as exc:
        # bcvk's own shape for every usage error: one line, then where to look.
        where = exc.ctx.command_path if exc.ctx is not None else "bcvk"
        report(UsageError(exc.format_message(), hint=f"see `{where} --help`"))
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        logger.error("aborted")
        return 130
    except BcvkError as exc:
        report(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130
    except BrokenPipeError:
        # `bcvk … | head` closing the pipe is not an error worth a traceback.
        sys.stderr.close()
        return 141
    except OSError as exc:
        # A file bcvk was told to use, or the host's state, refused: no bug in
        # bcvk, but a condition the user can act on, so one line.
        report(os_error(exc))
        return 1
    return result if isinstance(result, int) else 0


def entry() -> None:
    sys.exit(main())


def podman_bootc_entry() -> None:
    """The `podman-bootc` console script: `bcvk pb` under podman-bootc's name."""
    from bcvk.cli.pb import pb

    sys.exit(main(prog_name="podman-bootc", command=pb))


if __name__ == "__main__":
    entry()
