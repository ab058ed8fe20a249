#!/usr/bin/env python3
"""Benchmarks for ephemeral VMs (results go to docs/PERFORMANCE.md).

    .venv/bin/python bench/ephemeral_boot.py all --runs 10 --image localhost/bcvk/debian-bootc:12

Sections (each also runnable alone):

  boot     `bcvk ephemeral run-ssh IMAGE -- true` against a hand-written plain
           QEMU direct-kernel boot of the same kernel, initramfs and root
           (same transport), polled with the same `ssh … true`; A/B alternate.
  build    the cold cost of the block transport: mkfs.ext4 -d of the image
           tree, per GiB of tree.
  launch   command start → QEMU spawned, with virtiofsd and QEMU started
           concurrently (default) or one after the other (BCVK_LAUNCH=sequential).
  four     four detached VMs started at once; every one must reach SSH.
  warm     warm start against cold boot, interleaved: the plain-QEMU cold
           boot of `boot` (block root), `bcvk ephemeral run-ssh --warm off
           IMAGE -- true` (bcvk cold) and the same with the default --warm
           auto (restored); in the first --save-runs rounds also `--warm
           refresh` (cold, then the snapshot is saved before the command
           runs: what the first VM of a configuration pays).

The other sections pass `--warm off`: they measure the cold boot.

Run as root on an otherwise idle host; TCG timings swing with host load.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchlib import BCVK, ROOT, free_port, load, log, run

SSH_OPTS = [
    "-F", "none", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
    "-o", "ConnectTimeout=5",
]  # fmt: skip


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        v = values[0] if values else float("nan")
        return v, v, v
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def summary(values: list[float]) -> dict[str, float]:
    q1, med, q3 = quartiles(values)
    return {
        "n": len(values),
        "median": round(med, 2),
        "q1": round(q1, 2),
        "q3": round(q3, 2),
        "iqr": round(q3 - q1, 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
    }


# ---------------------------------------------------------------- artefacts


def cache_entry(image: str) -> Path:
    """The bcvk cache entry of IMAGE (kernel, initramfs, facts, rootfs.ext4)."""
    image_id = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", image],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "bcvk" / "images" / image_id


def detached_cold(image: str, transport: str, name: str, *options: str) -> list[str]:
    """`ephemeral run -d` booting cold (these sections measure the cold boot)."""
    return [BCVK, "ephemeral", "run", "-d", "--warm", "off", "--rootfs", transport,
            "--name", name, *options, image]  # fmt: skip


def warm_cache(image: str, transport: str) -> Path:
    """One bcvk start so the cache has everything; returns the entry."""
    name = f"bench-warm-{os.getpid()}"
    subprocess.run(
        detached_cold(image, transport, name),
        check=True,
        capture_output=True,
    )
    subprocess.run([BCVK, "ephemeral", "rm", "-f", name], check=True, capture_output=True)
    entry = cache_entry(image)
    facts = json.loads((entry / "facts.json").read_text())
    assert facts["kernels"], "image has no kernel"
    return entry


# ---------------------------------------------------------------- A: bcvk


def run_bcvk(image: str, transport: str, memory: str, vcpus: int) -> float:
    start = time.monotonic()
    result = subprocess.run(
        [
            BCVK, "ephemeral", "run-ssh", "--warm", "off", "--rootfs", transport,
            "--memory", memory, "--vcpus", str(vcpus), "--ssh-timeout", "1200", image,
            "--", "true",
        ],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        raise RuntimeError(f"bcvk failed: {result.stderr[-2000:]}")
    return elapsed


# ---------------------------------------------------------------- B: plain QEMU


def tmpfiles_credential(pubkey: str) -> str:
    key = base64.b64encode((pubkey.strip() + "\n").encode()).decode()
    text = f"d /root/.ssh 0700 root root -\nf~ /root/.ssh/authorized_keys 0600 root root - {key}\n"
    return "io.systemd.credential.binary:tmpfiles.extra=" + base64.b64encode(text.encode()).decode()


def run_baseline(image: str, transport: str, memory: str, vcpus: int, entry: Path) -> float:
    """Plain qemu-system-x86_64 + (virtiofsd) + an ssh poll loop, by hand."""
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bcvk-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    mounted = False
    try:
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "key")], check=True
        )
        port = free_port()
        mem_mib = int(memory.rstrip("G")) * 1024 if memory.endswith("G") else int(memory)
        argv = [
            "qemu-system-x86_64", "-nodefaults", "-nographic", "-no-reboot",
            "-machine", "q35,accel=tcg", "-cpu", "max", "-smp", str(vcpus), "-m", f"{mem_mib}M",
            "-kernel", str(entry / "vmlinuz"), "-initrd", str(entry / "initramfs.img"),
            "-serial", f"file:{work / 'console.log'}",
            "-device", "virtio-rng-pci",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
            "-device", "virtio-net-pci,netdev=n0",
            "-smbios", "type=11,value=" + tmpfiles_credential((work / "key.pub").read_text()),
        ]  # fmt: skip
        cmdline = "console=ttyS0 systemd.volatile=overlay panic=-1"
        if transport == "block":
            label = "bcvk-" + entry.name[:11]
            argv += [
                "-drive", f"file={entry / 'rootfs.ext4'},format=raw,if=none,id=d0,readonly=on",
                "-device", "virtio-blk-pci,drive=d0",
            ]  # fmt: skip
            cmdline += f" root=LABEL={label} rootfstype=ext4 ro"
        else:
            mnt = subprocess.run(
                ["podman", "image", "mount", image], capture_output=True, text=True, check=True
            ).stdout.strip()
            mounted = True
            sock = work / "fs.sock"
            procs.append(
                subprocess.Popen(
                    [
                        "/opt/bcvk/virtiofsd/bin/virtiofsd",
                        "--shared-dir",
                        mnt,
                        "--socket-path",
                        str(sock),
                        "--cache",
                        "never",
                        "--sandbox",
                        "none",
                        "--readonly",
                        "--allow-mmap",
                    ],
                    stderr=subprocess.DEVNULL,
                )  # fmt: skip
            )
            while not sock.exists():
                time.sleep(0.01)
            argv += [
                "-object", f"memory-backend-memfd,id=mem,size={mem_mib}M,share=on",
                "-numa", "node,memdev=mem",
                "-chardev", f"socket,id=fs,path={sock}",
                "-device", "vhost-user-fs-pci,chardev=fs,tag=rootfs",
            ]  # fmt: skip
            cmdline += " root=virtiofs:rootfs rootflags=ro ro"
        argv += ["-append", cmdline]
        procs.append(subprocess.Popen(argv, stderr=subprocess.DEVNULL))
        ssh = ["ssh", *SSH_OPTS, "-i", str(work / "key"), "-p", str(port), "root@127.0.0.1"]
        while subprocess.run([*ssh, "true"], capture_output=True).returncode != 0:
            if procs[-1].poll() is not None:
                raise RuntimeError("baseline QEMU exited")
            if time.monotonic() - start > 1200:
                raise RuntimeError("baseline timed out")
            time.sleep(0.5)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait()
        if mounted:
            subprocess.run(["podman", "image", "unmount", image], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return time.monotonic() - start


def bench_boot(args: argparse.Namespace) -> dict[str, object]:
    entry = warm_cache(args.image, args.transport)
    a: list[float] = []
    b: list[float] = []
    loads: list[float] = []
    for i in range(args.runs):
        order: list[tuple[str, Callable[[], float]]] = [
            ("bcvk", lambda: run_bcvk(args.image, args.transport, args.memory, args.vcpus)),
            (
                "qemu",
                lambda: run_baseline(args.image, args.transport, args.memory, args.vcpus, entry),
            ),
        ]
        if i % 2:
            order.reverse()
        for label, fn in order:
            loads.append(load())
            seconds = fn()
            (a if label == "bcvk" else b).append(seconds)
            log(f"boot run {i + 1}/{args.runs} {label}: {seconds:.1f}s (load {loads[-1]:.1f})")
    sa, sb = summary(a), summary(b)
    return {
        "transport": args.transport,
        "bcvk": sa,
        "qemu": sb,
        "ratio_of_medians": round(sa["median"] / sb["median"], 3),
        "paired_ratios": summary([x / y for x, y in zip(a, b, strict=True)]),
        "host_load": summary(loads),
        "raw": {"bcvk": [round(x, 2) for x in a], "qemu": [round(x, 2) for x in b]},
    }


# ---------------------------------------------------------------- build cost


def bench_build(args: argparse.Namespace) -> dict[str, object]:
    sys.path.insert(0, str(ROOT))
    from bcvk.ephemeral import cache as rootfs

    mnt = Path(
        subprocess.run(
            ["podman", "image", "mount", args.image], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    times = []
    try:
        used, inodes = rootfs.tree_usage(mnt)
        with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
            for _ in range(3):
                out = Path(tmp) / "rootfs.ext4"
                start = time.monotonic()
                rootfs.build_ext4(mnt, out, "bcvk-bench")
                times.append(time.monotonic() - start)
                image_size = out.stat().st_size
                out.unlink()
    finally:
        subprocess.run(["podman", "image", "unmount", args.image], capture_output=True)
    gib = used / 1024**3
    return {
        "tree_bytes": used,
        "inodes": inodes,
        "image_bytes": image_size,
        "seconds": summary(times),
        "seconds_per_gib": round(statistics.median(times) / gib, 2),
    }


# ---------------------------------------------------------------- launch phase


def launch_once(image: str, sequential: bool) -> tuple[float, float]:
    """(bcvk start → QEMU spawned, wall time of `run -d`)."""
    name = f"bench-launch-{os.getpid()}-{time.monotonic_ns()}"
    env = dict(os.environ)
    if sequential:
        env["BCVK_LAUNCH"] = "sequential"
    start = time.monotonic()
    result = subprocess.run(
        [BCVK, "--debug", "--log-format", "json", "ephemeral", "run", "-d", "--rootfs",
         "virtiofs", "--name", name, image],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    wall = time.monotonic() - start
    subprocess.run([BCVK, "ephemeral", "rm", "-f", name], capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    for line in result.stderr.splitlines():
        entry = json.loads(line)
        if entry["message"].startswith("launch phase: QEMU started"):
            return float(entry["message"].split()[4].rstrip("s")), wall
    raise RuntimeError("no launch-phase line in the debug log")


def bench_launch(args: argparse.Namespace) -> dict[str, object]:
    warm_cache(args.image, "virtiofs")
    spawn: dict[str, list[float]] = {"concurrent": [], "sequential": []}
    wall: dict[str, list[float]] = {"concurrent": [], "sequential": []}
    for i in range(args.launch_runs):
        for mode in ("concurrent", "sequential") if i % 2 == 0 else ("sequential", "concurrent"):
            s, w = launch_once(args.image, mode == "sequential")
            spawn[mode].append(s)
            wall[mode].append(w)
    return {
        "qemu_spawned": {m: summary(v) for m, v in spawn.items()},
        "run_d_wall": {m: summary(v) for m, v in wall.items()},
    }


# ---------------------------------------------------------------- four at once


def bench_four(args: argparse.Namespace) -> dict[str, object]:
    warm_cache(args.image, args.transport)
    start = time.monotonic()
    names = [f"bench-four-{os.getpid()}-{i}" for i in range(4)]
    starters = [
        subprocess.Popen(
            detached_cold(args.image, args.transport, name, "--memory", "1G", "--vcpus", "1"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name in names
    ]
    for proc in starters:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(err)
    ps = json.loads(
        subprocess.run(
            [BCVK, "ephemeral", "ps", "--format", "json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout  # fmt: skip
    )
    ports = sorted(e["ssh_port"] for e in ps if e["name"] in names)
    waiters = [
        subprocess.Popen(
            [BCVK, "ephemeral", "ssh", "--ssh-timeout", "1800", name, "--", "true"],
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    ready = []
    try:
        for proc in waiters:
            _, err = proc.communicate()
            ready.append(round(time.monotonic() - start, 1))
            if proc.returncode != 0:
                raise RuntimeError(err)
    finally:
        for name in names:
            subprocess.run([BCVK, "ephemeral", "rm", "-f", name], capture_output=True)
    return {"ssh_ports": ports, "distinct_ports": len(set(ports)) == 4, "all_ready_after_s": ready}


def warm_once(image: str, memory: str, vcpus: int, mode: str) -> tuple[float, str]:
    elapsed, result = run(
        [
            BCVK, "ephemeral", "run-ssh", "--warm", mode, "--memory", memory,
            "--vcpus", str(vcpus), "--ssh-timeout", "1200", image, "--", "true",
        ]
    )  # fmt: skip
    return elapsed, result.stderr


def bench_warm(args: argparse.Namespace) -> dict[str, object]:
    """Bare QEMU cold boot, bcvk cold (--warm off), bcvk warm; plus --warm refresh runs."""
    entry = warm_cache(args.image, "block")
    times: dict[str, list[float]] = {"qemu": [], "cold": [], "warm": [], "refresh": []}
    saves: list[float] = []
    loads: list[float] = []
    # A snapshot for the warm runs (and the first refresh figure).
    for i in range(args.runs):
        steps = ["refresh"] if i < args.save_runs else []
        steps += ["qemu", "cold", "warm"] if i % 2 == 0 else ["warm", "cold", "qemu"]
        for mode in steps:
            loads.append(load())
            if mode == "qemu":
                elapsed = run_baseline(args.image, "block", args.memory, args.vcpus, entry)
            else:
                flag = {"cold": "off", "refresh": "refresh", "warm": "auto"}[mode]
                elapsed, err = warm_once(args.image, args.memory, args.vcpus, flag)
                expect = "warm start: restoring" if mode == "warm" else "cold boot"
                if mode != "cold" and expect not in err:
                    sys.exit(f"run {i} ({mode}) did not start as expected:\n{err[-2000:]}")
                if mode == "refresh":
                    match = re.search(r"saved warm-start snapshot \S+ \((.*)\) in ([0-9.]+)s", err)
                    if not match:
                        sys.exit(f"run {i}: no snapshot saved:\n{err[-2000:]}")
                    saves.append(float(match.group(2)))
                    log(f"  snapshot {match.group(1)}")
            times[mode].append(elapsed)
            log(f"  run {i + 1}/{args.runs} {mode:8s} {elapsed:6.1f} s  (load {loads[-1]:.1f})")
    med = {mode: statistics.median(v) for mode, v in times.items() if v}
    snapshot = sorted(entry.glob("warm/*.state"))
    return {
        **{mode: summary(values) for mode, values in times.items() if values},
        "save_s": summary(saves) if saves else None,
        "snapshot_bytes": [p.stat().st_size for p in snapshot],
        "warm_over_cold": round(med["warm"] / med["cold"], 3),
        "warm_over_qemu": round(med["warm"] / med["qemu"], 3),
        "cold_over_qemu": round(med["cold"] / med["qemu"], 3),
        "first_vm_overhead": round(med["refresh"] / med["cold"] - 1, 3) if saves else None,
        "host_load": summary(loads),
        "raw": {mode: [round(x, 2) for x in v] for mode, v in times.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=["all", "boot", "build", "launch", "four", "warm"])
    parser.add_argument("--image", default="localhost/bcvk/debian-bootc:12")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--launch-runs", type=int, default=10)
    parser.add_argument("--save-runs", type=int, default=3, help="warm: --warm refresh runs")
    parser.add_argument("--transport", choices=["block", "virtiofs"], default="block")
    parser.add_argument("--memory", default="2G")
    parser.add_argument("--vcpus", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the JSON results here too")
    args = parser.parse_args()
    sections: dict[str, Callable[[argparse.Namespace], dict[str, object]]] = {
        "build": bench_build,
        "launch": bench_launch,
        "boot": bench_boot,
        "four": bench_four,
        "warm": bench_warm,
    }
    results: dict[str, object] = {"image": args.image, "nproc": os.cpu_count()}
    for name, fn in sections.items():
        if args.section in ("all", name):
            log(f"== {name}")
            results[name] = fn(args)
            log(json.dumps(results[name]))
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
