#!/usr/bin/env python3
"""Benchmarks for `bcvk libvirt` (results go to docs/PERFORMANCE.md, section "libvirt").

    .venv/bin/python bench/libvirt.py all --runs 3 --image localhost/bcvk/debian-bootc:12

Sections (each also runnable alone):

  ssh    time to a working SSH login: `bcvk libvirt run --ssh-wait IMAGE` on a
         warm base disk (the clone path every VM after the first takes)
         against `bcvk ephemeral run-ssh IMAGE -- true` of the same image,
         same memory and vCPUs, alternated A/B in one run so host load hits
         both alike.  The libvirt figure is split into "create" (base-disk
         check, clone, define, start) and "boot to SSH".
  logdir the cost of `--log-dir journal=DIR` (the guest's journal streamed over
         virtio-serial by a `journalctl --follow` in the guest): `libvirt
         run --ssh-wait` with and without it, alternated, on a warm base disk.
  list   `bcvk libvirt list --all` (and `--format json`) with 20 bcvk domains
         defined but not started in qemu:///system; budget 0.5 s.

Needs root (qemu:///system) and libvirtd running (`virtlogd -d; libvirtd -d`).
TCG timings swing with host load: the load average is printed with each run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

from benchlib import BCVK, load, log, median, run, spread

URI = "qemu:///system"
LABEL = "bcvk-bench"


def lv(*args: str) -> list[str]:
    return [BCVK, "libvirt", "-c", URI, *args]


def have_ephemeral() -> bool:
    probe = subprocess.run([BCVK, "ephemeral", "--help"], capture_output=True, check=False)
    return probe.returncode == 0


def warm_base_disk(image: str) -> str:
    """Build IMAGE's base disk (untimed); a tag for this run's VM names."""
    tag = uuid.uuid4().hex[:6]
    log("warming the base disk (untimed)…")
    warm = f"bench-lv-{tag}-warm"
    run(lv("create", "--name", warm, "--label", LABEL, image))
    run(lv("rm", "-f", warm))
    return tag


def bench_ssh(image: str, runs: int, memory: str, vcpus: int) -> dict[str, object]:
    tag = warm_base_disk(image)
    libvirt_total: list[float] = []
    libvirt_create: list[float] = []
    ephemeral: list[float] = []
    peer = have_ephemeral()
    for i in range(runs):
        name = f"bench-lv-{tag}-{i}"
        log(f"run {i + 1}/{runs}: load {load():.1f}")
        elapsed, result = run(
            lv("run", "--name", name, "--label", LABEL, "--memory", memory,
               "--cpus", str(vcpus), "--ssh-wait", "--timeout", "900", image)
        )  # fmt: skip
        ready = re.search(r"SSH ready after ([0-9.]+)s", result.stderr)
        boot = float(ready.group(1)) if ready else float("nan")
        libvirt_total.append(elapsed)
        libvirt_create.append(elapsed - boot)
        log(f"  libvirt run --ssh-wait: {elapsed:.1f} s (create {elapsed - boot:.1f} s)")
        run(lv("rm", "-f", name))
        if peer:
            log(f"  load {load():.1f}")
            elapsed, _ = run(
                [BCVK, "ephemeral", "run-ssh", "--memory", memory, "--vcpus", str(vcpus),
                 "--ssh-timeout", "900", image, "--", "true"]
            )  # fmt: skip
            ephemeral.append(elapsed)
            log(f"  ephemeral run-ssh -- true: {elapsed:.1f} s")
    data: dict[str, object] = {
        "libvirt_run_ssh_wait": libvirt_total,
        "libvirt_create_part": libvirt_create,
        "ephemeral_run_ssh": ephemeral,
    }
    print(f"libvirt run --ssh-wait (warm base): {spread(libvirt_total)}")
    print(f"  of which create+define+start:     {spread(libvirt_create)}")
    if ephemeral:
        print(f"ephemeral run-ssh -- true:          {spread(ephemeral)}")
        print(
            f"ratio libvirt / ephemeral:          {median(libvirt_total) / median(ephemeral):.2f}"
        )
    else:
        print("ephemeral run-ssh: not available in this tree")
    return data


def bench_logdir(image: str, runs: int, memory: str, vcpus: int) -> dict[str, object]:
    tag = warm_base_disk(image)
    times: dict[str, list[float]] = {"plain": [], "log_dir": []}
    journal_bytes: list[int] = []
    for i in range(runs):
        for kind in ("plain", "log_dir"):
            name = f"bench-lv-{tag}-{kind.replace('_', '')}-{i}"
            logs = Path(f"/tmp/{name}-logs")
            extra = ["--log-dir", f"journal={logs}"] if kind == "log_dir" else []
            log(f"run {i + 1}/{runs} {kind}: load {load():.1f}")
            elapsed, _ = run(
                lv("run", "--name", name, "--label", LABEL, "--memory", memory,
                   "--cpus", str(vcpus), *extra, "--ssh-wait", "--timeout", "900", image)
            )  # fmt: skip
            times[kind].append(elapsed)
            log(f"  {kind}: {elapsed:.1f} s")
            run(lv("rm", "-f", name))
            if kind == "log_dir":
                journal_bytes.append(sum(p.stat().st_size for p in logs.iterdir()))
                for path in logs.iterdir():
                    path.unlink()
                logs.rmdir()
    print(f"libvirt run --ssh-wait:                    {spread(times['plain'])}")
    print(f"libvirt run --ssh-wait --log-dir journal=: {spread(times['log_dir'])}")
    print(f"ratio with / without:                      "
          f"{median(times['log_dir']) / median(times['plain']):.2f}")  # fmt: skip
    print(f"journal files at SSH-ready, bytes:         {journal_bytes}")
    return {**times, "journal_bytes": journal_bytes}


def bench_list(image: str, count: int, repeats: int) -> dict[str, object]:
    tag = uuid.uuid4().hex[:6]
    names = [f"bench-list-{tag}-{i:02d}" for i in range(count)]
    log(f"defining {count} domains (not started)…")
    try:
        for name in names:
            run(lv("create", "--name", name, "--label", LABEL, "--disable-tpm", image))
        table: list[float] = []
        as_json: list[float] = []
        for _ in range(repeats):
            elapsed, result = run(lv("list", "--all"))
            assert sum(1 for n in names if n in result.stdout) == count
            table.append(elapsed)
            elapsed, result = run(lv("list", "--all", "--format", "json"))
            assert len([r for r in json.loads(result.stdout) if r["name"] in names]) == count
            as_json.append(elapsed)
    finally:
        log("removing them…")
        subprocess.run(lv("rm-all", "-f", "--label", LABEL), capture_output=True, check=False)
    print(f"list --all, {count} domains:               median {median(table) * 1000:.0f} ms "
          f"(max {max(table) * 1000:.0f} ms, n={repeats})")  # fmt: skip
    print(f"list --all --format json, {count} domains: median {median(as_json) * 1000:.0f} ms "
          f"(max {max(as_json) * 1000:.0f} ms, n={repeats})")  # fmt: skip
    return {"list_table": table, "list_json": as_json}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("section", choices=["ssh", "logdir", "list", "all"])
    parser.add_argument("--image", default="localhost/bcvk/debian-bootc:12")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory", default="2G")
    parser.add_argument("--vcpus", type=int, default=2)
    parser.add_argument("--domains", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write raw timings here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (qemu:///system)")
    results: dict[str, object] = {"load_start": load()}
    if args.section in ("list", "all"):
        results.update(bench_list(args.image, args.domains, args.repeats))
    if args.section in ("ssh", "all"):
        results.update(bench_ssh(args.image, args.runs, args.memory, args.vcpus))
    if args.section in ("logdir", "all"):
        results.update(bench_logdir(args.image, args.runs, args.memory, args.vcpus))
    results["load_end"] = load()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
