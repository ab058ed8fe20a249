"""`bcvk cache list|prune`: what bcvk keeps per image (kernel, facts, rootfs images)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from bcvk.cli import CONTEXT, options, output

if TYPE_CHECKING:
    from bcvk.ephemeral import CacheSnapshot


@click.group(context_settings=CONTEXT)
def cache() -> None:
    """Show or prune bcvk's per-image cache (kernels, block rootfs images)."""


@cache.command("list")
@options.format_option("table", "json")
def list_(fmt: str) -> None:
    """List cached images: size, warm-start snapshots, last use, present or in use."""
    from bcvk import ephemeral
    from bcvk.values import format_size

    infos = ephemeral.cache_list()
    output.emit_listing(
        fmt,
        infos,
        ["IMAGE ID", "IMAGE", "SIZE", "ROOTFS", "SNAPSHOTS", "LAST USED", "STATUS"],
        lambda i: (
            i.image_id[:12],
            i.image or "-",
            format_size(i.size),
            "yes" if i.has_rootfs else "no",
            _snapshots(i.snapshots),
            output.age(i.last_used),
            "in use" if i.in_use else ("image gone" if not i.image_present else "-"),
        ),
    )


@cache.command()
@click.option(
    "--days",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Also remove entries unused for this many days.",
)
@click.option("--all", "everything", is_flag=True, help="Remove every entry not in use.")
@click.option("--dry-run", is_flag=True, help="Only print what would be removed.")
def prune(days: float, everything: bool, dry_run: bool) -> None:
    """Remove entries whose image is gone or that were unused for --days.

    An entry in use by a running VM (or being built) is never removed; its
    warm-start snapshots unused for --days (with --all: every one not being
    saved) are.  Prints IMAGE-ID for a removed entry, IMAGE-ID/warm/KEY for
    a removed snapshot.
    """
    from bcvk import ephemeral
    from bcvk.log import logger
    from bcvk.values import format_size

    removed = ephemeral.cache_prune(older_than_days=days, everything=everything, dry_run=dry_run)
    for info in removed:
        if info.only_snapshots:
            for snap in info.snapshots:
                click.echo(f"{info.image_id}/warm/{snap.key}")
        else:
            click.echo(info.image_id)
    freed = sum(i.size for i in removed)
    verb = "would free" if dry_run else "freed"
    logger.info(
        "%d entr%s, %s %s",
        len(removed),
        "y" if len(removed) == 1 else "ies",
        verb,
        format_size(freed),
    )


def _snapshots(snaps: tuple[CacheSnapshot, ...]) -> str:
    from bcvk.values import format_size

    if not snaps:
        return "-"
    return f"{len(snaps)} ({format_size(sum(s.size for s in snaps))})"
