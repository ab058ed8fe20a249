"""`bcvk images list|inspect`."""

from __future__ import annotations

import sys

import click

from bcvk.cli import CONTEXT, options, output


@click.group(context_settings=CONTEXT)
def images() -> None:
    """Find bootc images in podman's store and check whether they boot."""


@images.command("list")
@options.format_option("table", "json", json_flag=True)
def list_(fmt: str) -> None:
    """List images labelled containers.bootc=1."""
    show_bootc_images(fmt)


def show_bootc_images(fmt: str) -> None:
    from bcvk.image import inspect as core
    from bcvk.values import format_size

    if fmt == "json":
        # podman's own entries, as `podman images --format json` and upstream print them
        output.emit_json(core.list_bootc_entries())
        return
    rows = core.list_bootc()
    output.emit_table(
        ["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"],
        [
            (r.repository, r.tag, r.id[:12], output.age(r.created), format_size(r.size))
            for r in rows
        ],
    )


def _table(data: dict[str, object]) -> list[tuple[str, object]]:
    os_info = data["os"]
    assert isinstance(os_info, dict)
    kernel = data["kernel"]
    kernels = data["kernels"]
    assert isinstance(kernels, list)
    kernel_text = (
        f"{kernel['version']} ({kernel['kind']})"
        if isinstance(kernel, dict)
        else ", ".join(f"{k['version']} ({k['kind']})" for k in kernels) or "none"
    )
    caps = data["initramfs_can_mount"]
    assert isinstance(caps, dict)
    can = ", ".join(k for k, v in caps.items() if v) or "unknown"

    def yes(value: object) -> str:
        return "yes" if value else "no"

    pairs: list[tuple[str, object]] = [
        ("Image", data["image"]),
        ("Bootable", yes(data["bootable"])),
        ("bootc label", yes(data["bootc_label"])),
        ("Architecture", data["architecture"]),
        ("OS", os_info.get("pretty_name") or os_info.get("id") or "unknown"),
        ("Kernel", kernel_text),
        ("Init", f"{data['init']} {data['systemd_version'] or ''}".strip()),
        (
            "sshd",
            "enabled"
            if data["sshd_enabled"]
            else ("installed, not enabled" if data["sshd_installed"] else "not installed"),
        ),
        ("bootc in image", yes(data["has_bootc"])),
        ("cloud-init", yes(data["has_cloud_init"])),
        ("Default target", data["default_target"]),
        ("Initramfs", f"{data['initramfs_generator']}; can mount: {can}"),
        ("Size", data["size"]),
        ("Digest", data["digest"]),
    ]
    for problem in data["problems"]:  # type: ignore[attr-defined]
        pairs.append(("Problem", problem))
    for warning in data["warnings"]:  # type: ignore[attr-defined]
        pairs.append(("Warning", warning))
    return pairs


@images.command()
@click.argument("image")
@options.format_option("table", "yaml", "json")
@click.pass_context
def inspect(ctx: click.Context, image: str, fmt: str) -> None:
    """Explain what is in IMAGE and whether it can boot.

    Exits 0 when the image is bootable, 1 with the problems on stderr when not.
    Missing labels and other non-fatal findings are listed as warnings.
    """
    from bcvk.image import inspect as core
    from bcvk.log import logger
    from bcvk.values import format_size

    report = core.inspect(image)
    data = report.to_json()
    if fmt == "json":
        output.emit_json(data)
    elif fmt == "yaml":
        output.emit_yaml(data)
    else:
        pairs = _table(data)
        pairs = [(k, format_size(int(str(v))) if k == "Size" else v) for k, v in pairs]
        output.emit_pairs(pairs)
    sys.stdout.flush()
    for problem in report.problems:
        logger.error("image %s cannot boot: %s", image, problem)
    if report.facts.kernel_problem():
        logger.info("hint: %s", report.facts.kernel_hint())
    if not report.bootable:
        ctx.exit(1)
