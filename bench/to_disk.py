"""Benchmark `bcvk to-disk` (native, qcow2, ext4) against its floor and virt-make-fs.

    sudo .venv/bin/python bench/to_disk.py [--runs 5] [--peer-runs 5] [--image IMAGE]

Per round, interleaved so that host load hits all alike:
  ours   `bcvk to-disk IMAGE out.qcow2` from scratch (podman mount, tree scan,
         mkfs.ext4 -d, debugfs, ESP, partition table, qemu-img convert, unmount)
  floor  `mkfs.ext4 -d TREE` of the image's mounted tree (mounted untimed) into
         a file of the same size + `qemu-img convert -O qcow2` of it + deleting
         the intermediate file (bcvk's run also ends with just the qcow2)
  peer   `virt-make-fs --format=qcow2 --type=ext4 --partition=gpt --size=4G TREE`
         of a private copy of the tree (libguestfs tars it into an appliance VM
         booted under TCG here, so a TCG figure)
and afterwards the cached reuse: `bcvk to-disk` again with the same options.
Prints medians, ratios and a Markdown table for docs/PERFORMANCE.md.
Needs root (reads the image tree for the floor and the peer).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchlib import BCVK, run

IMAGE = "localhost/bcvk/debian-bootc:12"
ROOT_SIZE = 3584 * 1024 * 1024  # the root partition of a 4 GiB bcvk disk


def timed(argv: Sequence[str | Path], env: dict[str, str] | None = None) -> float:
    return run(argv, env=env)[0]


def mount(image: str) -> Path:
    result = subprocess.run(["podman", "image", "mount", image], capture_output=True, text=True,
                            check=True)  # fmt: skip
    return Path(result.stdout.strip())


def unmount(image: str) -> None:
    subprocess.run(["podman", "image", "unmount", image], capture_output=True, check=False)


def guestfs_env(tree: Path, cache: Path) -> dict[str, str]:
    """libguestfs needs a host kernel; hosts without one borrow the image's."""
    env = {"LIBGUESTFS_BACKEND": "direct", "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}
    if list(Path("/boot").glob("vmlinuz-*")):
        return env
    modules = sorted((tree / "usr" / "lib" / "modules").iterdir())[0]
    kdir = cache / "guestfs-kernel"
    if not (kdir / "vmlinuz").exists():
        kdir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(modules / "vmlinuz", kdir / "vmlinuz")
        shutil.copytree(modules, kdir / "modules", symlinks=True, dirs_exist_ok=True)
    # supermin lstat()s /lib/modules even when told where the modules are
    Path("/lib/modules").mkdir(parents=True, exist_ok=True)
    env.update(
        SUPERMIN_KERNEL=str(kdir / "vmlinuz"),
        SUPERMIN_MODULES=str(kdir / "modules"),
        SUPERMIN_KERNEL_VERSION=modules.name,
    )
    return env


def version(argv: Sequence[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).strip().splitlines()[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", default=IMAGE)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--peer-runs", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--json", action="store_true", help="print raw results as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the floor and virt-make-fs read the image tree")
    if args.peer_runs and shutil.which("virt-make-fs") is None:
        sys.exit("virt-make-fs not found: apt-get install libguestfs-tools")

    work = Path(tempfile.mkdtemp(prefix="bcvk-bench-to-disk-", dir=args.workdir))
    mounted = mount(args.image)
    # The floor and the peer read a private copy: a shared image mount can be
    # remounted by other users of the host mid-run (tar then fails with "file
    # changed as we read it").  bcvk mounts the image itself, as users do.
    tree = work / "tree"
    subprocess.run(["cp", "-a", f"{mounted}/.", tree], check=True)
    unmount(args.image)
    times: dict[str, list[float]] = {"ours": [], "floor": [], "peer": [], "reuse": []}
    try:
        env = guestfs_env(tree, args.workdir / "bcvk-bench-cache")
        if args.peer_runs:
            # one untimed peer run builds the supermin appliance cache
            timed(["virt-make-fs", "--format=qcow2", "--type=ext4", "--partition=gpt",
                   "--size=4G", tree, work / "warm.qcow2"], env)  # fmt: skip
            (work / "warm.qcow2").unlink()
        ours = work / "ours.qcow2"
        for i in range(max(args.runs, args.peer_runs)):
            if i < args.runs:
                ours.unlink(missing_ok=True)
                times["ours"].append(timed([BCVK, "to-disk", args.image, ours]))
                # the floor reads the same image mount bcvk reads (mounted untimed)
                image_tree = mount(args.image)
                root = work / "floor.img"
                with open(root, "wb") as f:
                    f.truncate(ROOT_SIZE)
                start = time.monotonic()
                timed(["mkfs.ext4", "-q", "-F", "-d", image_tree, root])
                timed(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", root,
                       work / "floor.qcow2"])  # fmt: skip
                root.unlink()  # a pipeline leaves one qcow2, as bcvk does
                times["floor"].append(time.monotonic() - start)
                unmount(args.image)
                (work / "floor.qcow2").unlink()
            if i < args.peer_runs:
                peer = work / "peer.qcow2"
                argv: list[str | Path] = [
                    "virt-make-fs", "--format=qcow2", "--type=ext4", "--partition=gpt",
                    "--size=4G", tree, peer,
                ]  # fmt: skip
                times["peer"].append(timed(argv, env))
                peer.unlink()
            print(f"round {i + 1}: " + ", ".join(
                f"{k} {v[-1]:.2f}s" for k, v in times.items() if v), file=sys.stderr)  # fmt: skip
        for _ in range(args.runs):
            times["reuse"].append(timed([BCVK, "to-disk", args.image, ours]))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) if v else float("nan") for k, v in times.items()}
    report = {
        "image": args.image,
        "host": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
        "load_before_after": os.getloadavg(),
        "runs": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "median": {k: round(v, 3) for k, v in med.items()},
        "ours_over_floor": round(med["ours"] / med["floor"], 2),
        "peer_over_ours": round(med["peer"] / med["ours"], 1),
        "tools": {
            "mke2fs": version(["mkfs.ext4", "-V"]),
            "qemu-img": version(["qemu-img", "--version"]),
            "virt-make-fs": version(["virt-make-fs", "--version"]),
        },
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print("| what | median (s) | runs (s) |\n|---|---|---|")
    names = {
        "ours": "`bcvk to-disk` (native, qcow2, ext4), cold",
        "floor": "floor: `mkfs.ext4 -d` + `qemu-img convert`",
        "peer": "`virt-make-fs` (appliance under TCG)",
        "reuse": "`bcvk to-disk` again (cache hit)",
    }
    for key, label in names.items():
        runs = ", ".join(f"{x:.2f}" for x in times[key])
        print(f"| {label} | {med[key]:.2f} | {runs} |")
    ratio, peer = report["ours_over_floor"], report["peer_over_ours"]
    print(f"\nours / floor = {ratio}×; virt-make-fs / ours = {peer}×; reuse = {med['reuse']:.2f} s")
    print(json.dumps(report["tools"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
