"""`bcvk doctor`."""

from __future__ import annotations

import click

from bcvk.cli import CONTEXT, options, output


@click.command(context_settings=CONTEXT)
@options.format_option("table", "json")
@click.option(
    "--image", help="bootc image whose kernel the KVM probe boots (default: any local one)."
)
@click.option(
    "--refresh", is_flag=True, help="Re-run the KVM probe instead of using its cached verdict."
)
@click.pass_context
def doctor(ctx: click.Context, fmt: str, image: str | None, refresh: bool) -> None:
    """Report what this host has for running bootc images as VMs.

    Lists each tool bcvk uses (path, version, or the package that provides it),
    whether KVM really runs a Linux guest here or bcvk will use TCG, virtiofsd,
    OVMF firmware, libvirt and rootless podman.  Exits non-zero only when
    something required is missing.
    """
    from bcvk import doctor as core

    checks = core.run_checks(image, refresh)
    ok = core.healthy(checks)
    if fmt == "json":
        accel = next(c for c in checks if c.name == "acceleration")
        output.emit_json(
            {
                "ok": ok,
                "accel": accel.version,
                "checks": [c.to_json() for c in checks],
            }
        )
    else:
        rows = []
        for c in checks:
            if c.name == "acceleration":
                status, detail = (c.version or "?"), c.detail.split(": ", 1)[-1]
            elif c.ok:
                status, detail = "ok", c.version or c.detail
            else:
                status = "MISSING" if c.required else "missing"
                pkgs = c.packages
                detail = c.detail
                if pkgs:
                    detail += f" (Debian: {pkgs['debian']}; Fedora: {pkgs['fedora']})"
            rows.append((c.name, status, detail))
        output.emit_table(["CHECK", "STATUS", "DETAIL"], rows)
    if not ok:
        ctx.exit(1)
