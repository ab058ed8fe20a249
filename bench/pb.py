#!/usr/bin/env python3
"""Benchmarks for `bcvk pb` (results go to docs/PERFORMANCE.md, section "pb").

    .venv/bin/python bench/pb.py --runs 3 --ssh-runs 9 --image localhost/bcvk/debian-bootc:12

podman-bootc itself cannot run on these hosts (it needs a rootful podman
machine and a registry), so the seed's "within 20 % of podman-bootc" is
measured against stand-ins:

  cold   `bcvk pb run -B IMAGE` with no cached disk: the disk build itself
         (the figure to-disk logs) and the whole run.  That VM then serves
         `ssh` and keeps the base disk warm for `ready`.
  ready  `bcvk pb run -B IMAGE` to a working SSH login against
         `bcvk libvirt run --ssh-wait` of the same image with the same memory,
         vCPUs and disk inputs (so the same warm base disk), alternated A/B in
         one run so host load hits both alike.  Same machinery: ratio ≤ 1.05.
  ssh    `bcvk pb ssh ID -- true` on a running VM (shared SSH connection)
         against `bcvk libvirt ssh NAME -- true` on the same VM (a full SSH
         handshake each time); median of --ssh-runs.

Needs root (qemu:///system) and libvirtd running (`virtlogd -d; libvirtd -d`).
TCG timings swing with host load: the load average is printed with each run.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

from benchlib import BCVK, load, log, median, run, spread

URI = "qemu:///system"
MEMORY = "2048"
DISK = {"size": "10G"}  # --disk-size; another value keeps the bench off the tests' base disk
TIMEOUT = "1200"


def pb(*args: str) -> list[str]:
    return [BCVK, "pb", "-c", URI, *args]


def pb_run(image: str, name: str) -> tuple[float, str, str]:
    elapsed, result = run(
        pb(
            "run",
            "-B",
            "--quiet",
            "--name",
            name,
            "--memory",
            MEMORY,
            "--disk-size",
            DISK["size"],
            "--timeout",
            TIMEOUT,
            image,
        )  # fmt: skip
    )
    return elapsed, result.stdout.strip(), result.stderr


def pb_rm(ref: str) -> None:
    subprocess.run(pb("rm", "-f", ref), capture_output=True, check=False)


def lv_run(image: str, name: str) -> float:
    elapsed, _ = run(
        [
            BCVK, "libvirt", "-c", URI, "run", "--name", name, "--memory", f"{MEMORY}M",
            "--cpus", "2", "--disk-size", DISK["size"], "--ssh-wait", "--timeout", TIMEOUT, image,
        ]
    )  # fmt: skip
    return elapsed


def lv_rm(name: str) -> None:
    subprocess.run([BCVK, "libvirt", "-c", URI, "rm", "-f", name], capture_output=True, check=False)


def bench_ready(image: str, runs: int) -> dict[str, object]:
    """A/B pairs on a warm base disk (a VM of the image must exist to keep it warm)."""
    tag = uuid.uuid4().hex[:6]
    pbs: list[float] = []
    lvs: list[float] = []
    loads: list[float] = []
    for i in range(runs):
        loads.append(load())
        order = ("pb", "lv") if i % 2 == 0 else ("lv", "pb")
        for which in order:
            name = f"bench-{which}-{tag}-{i}"
            if which == "pb":
                seconds, vm_id, _ = pb_run(image, name)
                pb_rm(vm_id)
                pbs.append(seconds)
            else:
                seconds = lv_run(image, name)
                lv_rm(name)
                lvs.append(seconds)
            log(f"  pair {i + 1}: {which} {seconds:.1f} s (load {load():.1f})")
    return {
        "pb_run_B": pbs,
        "libvirt_run_ssh_wait": lvs,
        "ratio": median(pbs) / median(lvs),
        "load": loads,
    }


def cold_run(image: str, name: str) -> tuple[dict[str, object], str]:
    """`pb run -B` with no cached base disk; the VM stays up (returns its ID)."""
    pools = Path("/var/lib/libvirt/images")
    before = {p.name for p in pools.glob("bootc-base-*.qcow2")}
    seconds, vm_id, err = pb_run(image, name)
    built = re.search(r"Wrote \S+ \(qcow2, \w+, ([\d.]+)s\)", err)
    new = {p.name for p in pools.glob("bootc-base-*.qcow2")} - before
    if not new or built is None:
        pb_rm(vm_id)
        sys.exit("the cold run reused a base disk: remove VMs of the image with these options")
    cold: dict[str, object] = {
        "run_seconds": seconds,
        "disk_build_seconds": float(built.group(1)),
        "load": load(),
    }
    return cold, vm_id


def bench_ssh(vm_id: str, name: str, runs: int) -> dict[str, object]:
    shared: list[float] = []
    full: list[float] = []
    run(pb("ssh", vm_id, "--", "true"))  # untimed: the first call may open the connection
    for _ in range(runs):
        shared.append(run(pb("ssh", vm_id, "--", "true"))[0])
        full.append(run([BCVK, "libvirt", "-c", URI, "ssh", name, "--", "true"])[0])
    return {"pb_ssh_true": shared, "libvirt_ssh_true": full, "load": load()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="localhost/bcvk/debian-bootc:12")
    parser.add_argument("--runs", type=int, default=3, help="A/B pairs for `ready`")
    parser.add_argument("--ssh-runs", type=int, default=9)
    parser.add_argument("--disk-size", default="10G")
    args = parser.parse_args()
    DISK["size"] = args.disk_size
    results: dict[str, object] = {"load_at_start": load(), "disk_size": args.disk_size}
    name = f"bench-pb-{uuid.uuid4().hex[:6]}-main"
    cold, vm_id = cold_run(args.image, name)
    results["cold"] = cold
    log(f"cold: disk build {cold['disk_build_seconds']:.1f} s, run {cold['run_seconds']:.1f} s")
    try:
        ssh = bench_ssh(vm_id, name, args.ssh_runs)
        results["ssh"] = ssh
        log(f"pb ssh -- true:      {spread(ssh['pb_ssh_true'], 2)}")  # type: ignore[arg-type]
        log(f"libvirt ssh -- true: {spread(ssh['libvirt_ssh_true'], 2)}")  # type: ignore[arg-type]
        ready = bench_ready(args.image, args.runs)  # the main VM keeps the base disk warm
        results["ready"] = ready
        log(f"pb run -B:              {spread(ready['pb_run_B'])}")  # type: ignore[arg-type]
        log(f"libvirt run --ssh-wait: {spread(ready['libvirt_run_ssh_wait'])}")  # type: ignore[arg-type]
        log(f"ratio: {ready['ratio']:.3f}")
    finally:
        pb_rm(vm_id)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
