"""The guest's boot report (``status.sh`` on the port org.bcvk.status), read by the host.

The report arrives once the SSH server's start job has finished, so when no
SSH unit is running it says so seconds after the guest knows, and why:
masked, failed, missing; plus what the layout step could not do and whether
the key arrived.  ``parse`` returns ``None`` until the report is complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class UnitState:
    name: str
    load: str  # loaded, masked, not-found, error…
    active: str  # active, activating, failed, inactive…
    sub: str
    result: str


@dataclass(frozen=True)
class BootReport:
    units: tuple[UnitState, ...]
    key_present: bool
    execute_present: bool
    problems: tuple[str, ...] = field(default=())

    def ssh_running(self) -> bool:
        """Whether an SSH unit is up or on its way (a restart counts as on its way)."""
        return any(u.active in ("active", "activating", "reloading") for u in self.units)

    def ssh_problem(self) -> str | None:
        """Why SSH cannot answer, or None while it may."""
        if self.ssh_running():
            if self.problems and not self.key_present:
                # sshd may still be starting, but with no key and a read-only
                # tree it cannot let bcvk in.
                return "; ".join(("the SSH key did not arrive", *self.problems))
            return None
        known = [u for u in self.units if u.load not in ("not-found", "")]
        masked = [u.name for u in known if u.load == "masked"]
        failed = [u for u in known if u.active == "failed"]
        if failed:
            unit = failed[0]
            why = f"{unit.name} failed (result: {unit.result})"
        elif masked:
            why = f"{' and '.join(masked)} {'is' if len(masked) == 1 else 'are'} masked"
        elif known:
            names = ", ".join(f"{u.name} ({u.active})" for u in known)
            why = f"no SSH unit was started: {names}"
        else:
            why = "the image has no SSH unit (ssh.service, sshd.service or a socket)"
        return "; ".join((why, *self.problems))


def parse(text: str) -> BootReport | None:
    """The report in TEXT, or None if it has not all arrived."""
    lines = text.splitlines()
    if "done" not in lines:
        return None
    units: list[UnitState] = []
    key = execute = False
    problems: list[str] = []
    for line in lines[: lines.index("done")]:
        kind, _, rest = line.partition(" ")
        if kind == "unit":
            name, _, props = rest.partition(" ")
            values = dict(p.partition("=")[::2] for p in props.split())
            units.append(
                UnitState(
                    name,
                    values.get("LoadState", ""),
                    values.get("ActiveState", ""),
                    values.get("SubState", ""),
                    values.get("Result", ""),
                )
            )
        elif kind == "key":
            key = rest == "present"
        elif kind == "execute":
            execute = rest == "present"
        elif kind == "problem":
            problems.append(rest)
    return BootReport(tuple(units), key, execute, tuple(problems))
