"""`bcvk varlink serve`: upstream's varlink API on a socket."""

from __future__ import annotations

import click

from bcvk.cli import CONTEXT


@click.group(context_settings=CONTEXT)
def varlink() -> None:
    """Upstream bcvk's varlink API: io.bootc.vk.images, .ephemeral and .todisk.

    \b
    Examples:
      bcvk varlink serve --address unix:/run/bcvk.sock
      systemd-socket-activate -l /run/bcvk.sock bcvk      # bcvk with no arguments
      varlinkctl call exec:bcvk io.bootc.vk.images.List {} # systemd ≥ 255
    """


@varlink.command(context_settings=CONTEXT)
@click.option(
    "--address",
    metavar="unix:PATH",
    help="Listen on a new Unix socket at PATH (removed again on exit).  "
    "[default: the socket-activated fd 3]",
)
def serve(address: str | None) -> None:
    """Answer varlink calls until interrupted (or, on an activated connection, its end)."""
    from bcvk import varlink as api
    from bcvk.errors import UsageError
    from bcvk.log import logger
    from bcvk.varlink import server

    path = server.parse_address(address) if address is not None else None
    fd = server.activation_fd() if path is None else None
    if path is None and fd is None:
        raise UsageError(
            "no socket to serve: no --address and no socket activation ($LISTEN_FDS)",
            hint="pass --address unix:PATH, or run under systemd-socket-activate -l PATH bcvk",
        )
    try:
        if path is not None:
            server.serve_unix(api.service(), path)
        elif fd is not None:
            server.serve_activated(api.service(), fd)
    except KeyboardInterrupt:
        # Being stopped (Ctrl-C, SIGTERM from a service manager) is how a server ends.
        logger.info("varlink: stopped")
