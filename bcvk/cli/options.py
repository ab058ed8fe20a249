"""Click options shared by several commands, each declared once, choices from the enums.

A flag that means the same in two commands (``--filesystem``, ``-p``,
``--firmware``, ``--format``) is defined here, so its spelling, choices and
help cannot drift apart; the values still reach the core as text and are
parsed there, once, by the same functions the Python API uses.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from bcvk.values import Firmware

F = TypeVar("F", bound=Callable[..., Any])

# Filesystem and formats live in bcvk.to_disk, which the CLI must not import
# to build --help: the choices are spelled here and checked against the enums
# by a unit test (tests/unit/test_cli.py).
FILESYSTEMS = ("ext4", "xfs", "btrfs")


def filesystem_option(help_text: str = "Root filesystem.") -> Callable[[F], F]:
    return click.option("--filesystem", type=click.Choice(FILESYSTEMS), help=help_text)


def port_option(fn: F) -> F:
    return click.option(
        "-p",
        "--port",
        "ports",
        multiple=True,
        metavar="HOST:GUEST",
        help="Forward 127.0.0.1:HOST to the guest's GUEST port (repeatable).",
    )(fn)


def firmware_option(
    *members: Firmware, help_text: str, extra: tuple[str, ...] = ()
) -> Callable[[F], F]:
    return click.option(
        "--firmware",
        type=click.Choice([m.value for m in members] + list(extra)),
        default=members[0].value,
        show_default=True,
        help=help_text,
    )


if TYPE_CHECKING:
    _FloatType = click.ParamType[float, object]
else:  # click < 8.5 has no type parameters
    _FloatType = click.ParamType


class Seconds(_FloatType):
    """A timeout: finite, positive, at most a week (``nan`` would wait forever)."""

    name = "seconds"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        from bcvk.errors import UsageError
        from bcvk.values import parse_timeout

        what = param.opts[-1] if param is not None and param.opts else "timeout"
        try:
            return parse_timeout(value if isinstance(value, float | str) else str(value), what)
        except UsageError as exc:
            self.fail(exc.message, param, ctx)


def timeout_option(flag: str, default: float, help_text: str) -> Callable[[F], F]:
    return click.option(
        flag, type=Seconds(), default=default, show_default=True, metavar="SECONDS", help=help_text
    )


def format_option(*members: str, json_flag: bool = False) -> Callable[[F], F]:
    """``--format`` over MEMBERS (``OutputFormat``s, or ``"xml"``), the first the
    default, passed as ``fmt``.

    JSON_FLAG adds upstream's ``--json`` spelling; the command then just sees
    ``fmt="json"``.
    """
    names = [str(m) for m in members]

    def decorate(fn: F) -> F:
        target: Callable[..., Any] = fn
        if json_flag:

            @functools.wraps(fn)
            def folded(*args: Any, as_json: bool, fmt: str, **kwargs: Any) -> Any:
                return fn(*args, fmt="json" if as_json else fmt, **kwargs)

            target = click.option("--json", "as_json", is_flag=True, help="Same as --format json.")(
                folded
            )
        option = click.option(
            "--format",
            "fmt",
            type=click.Choice(names),
            default=names[0],
            show_default=True,
            help=(
                "Table for people, JSON for scripts."
                if set(names) == {"table", "json"}
                else "Output format."
            ),
        )
        return cast(F, option(target))

    return decorate


def libvirt_uri(ctx: click.Context) -> str | None:
    """The -c/--connect URI of `bcvk libvirt` (before or after the verb)."""
    obj = ctx.find_object(dict)
    value = obj.get("uri") if obj else None
    return value if isinstance(value, str) else None
