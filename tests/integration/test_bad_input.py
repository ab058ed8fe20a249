"""Bad input to every command group: one error line and a hint, and nothing left.

Table-driven, after the 2026-12 audit's probe table (IDs kept where a probe
comes from it).  Each probe runs the real bcvk against the real podman store
and libvirt, and asserts:

- a non-zero exit (2 for usage errors, 1 for the rest);
- exactly one ``error:`` line, containing the expected words, then a ``hint:``;
- no traceback;
- nothing left behind: no process carrying the probe's marker, no new image
  mount, no new file or directory in the probe's output directory, runtime
  directory, bcvk's data directory, libvirt's pool directory or /var/tmp.

libvirt probes that must be refused *before* connecting use a URI whose
socket does not exist, as if libvirtd were down: an answer of "cannot
connect" means the input was not checked first.  Probes that need a
connection use libvirt's built-in test driver.
"""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import DEMO_IMAGE, FIXTURES, bcvk, image_exists
from tests.integration.ephemeral_support import marked_processes, mount_counts

pytestmark = pytest.mark.integration

DOWN = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
TEST = "test:///default"
HUGE = "9" * 400
LONG = "a" * 256


@dataclass(frozen=True)
class Probe:
    id: str
    args: tuple[str, ...]
    rc: int
    expect: str  # words the error line must contain
    env: tuple[tuple[str, str], ...] = ()


def p(id: str, rc: int, expect: str, *args: str, env: dict[str, str] | None = None) -> Probe:
    return Probe(id, args, rc, expect, tuple((env or {}).items()))


IMG = "{IMG}"
OUT = "{OUT}"

# One probe per line, as in the audit's table.
# fmt: off
PROBES = [
    # ------------------------------------------------------------ images
    p("I02", 1, "not in local storage", "images", "inspect", "localhost/bcvk/nonexistent:1"),
    p("I04", 2, "invalid image reference", "images", "inspect", "--", "-rf"),
    p("I05", 2, "invalid image reference", "images", "inspect", "bad ref!"),
    p("I06", 2, "invalid image reference", "images", "inspect", "localhost/" + "a" * 600),
    p("I07", 2, "invalid image reference", "images", "inspect", "ümlaut/img:1"),
    p("I09", 1, "cannot boot", "images", "inspect", "{not-bootc}"),
    p("I12", 1, "found 2 kernels", "images", "inspect", "{two-kernels}"),
    p("I13", 2, "--format", "images", "list", "--format", "yaml"),
    p("I15", 2, "invalid image reference", "images", "inspect", DEMO_IMAGE + "\n"),
    p("G01", 2, "--bogus", "--bogus"),
    p("G02", 2, "nosuchcmd", "nosuchcmd"),
    # --------------------------------------------------------- ephemeral
    p("E01", 1, "not in local storage", "ephemeral", "run", "--pull", "never",
      "localhost/bcvk/nonexistent:1"),
    p("E03", 2, "invalid image reference", "ephemeral", "run", "--", "-rf"),
    p("E05", 2, "invalid VM name", "ephemeral", "run", "--name", "-rf", IMG),
    p("E07", 2, "invalid VM name", "ephemeral", "run", "--name", "../x", IMG),
    p("E08", 2, "invalid VM name", "ephemeral", "run", "--name", "a" * 64, IMG),
    p("E10", 2, "invalid VM name", "ephemeral", "run", "--name", "ok\n", IMG),
    p("E11", 2, "--memory", "ephemeral", "run", "--memory", "64M", IMG),
    p("E13", 2, "--memory", "ephemeral", "run", "--memory", "0", IMG),
    p("E15", 2, "--memory", "ephemeral", "run", "--memory", "1e9", IMG),
    p("E16", 2, "--memory", "ephemeral", "run", "--memory", HUGE, IMG),
    p("E17", 2, "--vcpus", "ephemeral", "run", "--vcpus", "0", IMG),
    p("E19", 2, "--vcpus", "ephemeral", "run", "--vcpus", "two", IMG),
    p("E20", 2, "instance type", "ephemeral", "run", "--itype", "u1.huge", IMG),
    p("E21", 2, "kernel argument", "ephemeral", "run", "--karg", "a\nb", IMG),
    p("E21t", 2, "kernel argument", "ephemeral", "run", "--karg", "a\tb", IMG),
    p("E23", 2, "no such directory", "ephemeral", "run", "--bind", "/nonexistent", IMG),
    p("E24", 2, "share name", "ephemeral", "run", "--bind", "/tmp:../x", IMG),
    p("E26", 2, "same name", "ephemeral", "run", "--bind", "/tmp:a", "--ro-bind", "/var:a", IMG),
    p("E27", 2, "--bind", "ephemeral", "run", "--bind", f"{OUT}/{LONG}:x", IMG),
    p("E27u", 2, "cannot expand", "ephemeral", "run", "--bind", "~no-such-user/x", IMG),
    p("E28", 2, "not a regular file", "ephemeral", "run", "--mount-disk-file", f"{OUT}:x", IMG),
    p("E29", 2, "disk format", "ephemeral", "run", "--mount-disk-file", f"{OUT}/d.img:x:vmdk", IMG),
    p("E30", 2, "does not exist", "ephemeral", "run", "--mount-disk-file", "/nonexistent/d.img",
      IMG),
    p("E32", 2, "--mount-disk-file", "ephemeral", "run", "--mount-disk-file", "a:b:c:d", IMG),
    p("E33", 2, "--mount-disk-file", "ephemeral", "run", "--mount-disk-file", f"{OUT}/{LONG}", IMG),
    p("E34", 2, "port", "ephemeral", "run", "-p", "0:22", IMG),
    p("E35", 2, "port", "ephemeral", "run", "-p", "70000:22", IMG),
    p("E36", 2, "port forward", "ephemeral", "run", "-p", "8080", IMG),
    p("E37", 2, "twice", "ephemeral", "run", "-p", "8080:80", "-p", "8080:81", IMG),
    p("E39", 2, "--add-swap", "ephemeral", "run", "--add-swap", "1K", IMG),
    p("E40", 2, "--add-swap", "ephemeral", "run", "--add-swap", "lots", IMG),
    p("E41", 2, "--log-dir", "ephemeral", "run", "--log-dir", f"bogus={OUT}/x", IMG),
    p("U04", 2, "invalid label", "ephemeral", "run", "--label", "-x", IMG),
    p("U05", 2, "invalid label", "ephemeral", "ps", "--label", "a b"),
    p("U06", 2, "user-data", "ephemeral", "run", "--cloud-init", OUT, IMG),
    p("U07", 2, "cannot be combined", "ephemeral", "run", "--cloud-init", f"{OUT}/foreign.raw",
      "--cloud-init-empty", IMG),
    p("U08", 2, "exactly one of SRC and DST", "ephemeral", "scp", "a", "b"),
    p("U09", 1, "no ephemeral VM named", "ephemeral", "scp", "nosuchvm:/x", OUT),
    p("U01", 2, "no such directory", "ephemeral", "run", "--systemd-units", "/nonexistent", IMG),
    p("U02", 2, "not a directory", "ephemeral", "run-ssh", "--systemd-units",
      f"{OUT}/foreign.raw", IMG),
    p("U03", 2, "is not a unit file", "ephemeral", "run", "--systemd-units", OUT, IMG),
    p("E42", 2, "--ssh-timeout", "ephemeral", "run", "--ssh-timeout", "0", IMG),
    p("E42n", 2, "--ssh-timeout", "ephemeral", "run", "--ssh-timeout", "nan", IMG),
    p("E44", 2, "--ssh-timeout", "ephemeral", "run", "--ssh-timeout", "abc", IMG),
    p("E45", 2, "--rootfs", "ephemeral", "run", "--rootfs", "bogus", IMG),
    p("E48", 2, "--detach", "ephemeral", "run", "-d", "--console", IMG),
    p("E49", 1, "not an executable", "ephemeral", "run", "--virtiofsd", "/etc/passwd", IMG),
    p("E51", 1, "cannot boot", "ephemeral", "run", "{no-kernel}"),
    p("E54", 1, "cannot boot", "ephemeral", "run", "--log-dir", f"{OUT}/logs", "{no-kernel}"),
    p("E55", 2, "--log-dir", "ephemeral", "run", "--log-dir", f"{OUT}/{LONG}", IMG),
    p("E55p", 2, "does not exist", "ephemeral", "run", "--log-dir", f"{OUT}/a/b", IMG),
    p("E57", 2, "invalid VM name", "ephemeral", "run-ssh", "--name", "-rf", IMG, "true"),
    p("E59", 2, "invalid VM name", "ephemeral", "ssh", "--", "-rf"),
    p("E60", 1, "no ephemeral VM named", "ephemeral", "ssh", "nonexistent", "--", "true"),
    p("E62", 1, "no ephemeral VM named", "ephemeral", "rm", "nonexistent"),
    p("E65", 2, "invalid VM name", "ephemeral", "rm", "../x"),
    p("E67", 2, "--format", "ephemeral", "ps", "--format", "yaml"),
    p("E68", 2, "--memory", "run-ephemeral", "--memory", "1", IMG),
    p("E70", 2, "accelerator", "ephemeral", "run", IMG, env={"BCVK_ACCEL": "hvf"}),
    p("E72", 1, "/nonexistent", "ephemeral", "run", IMG, env={"QEMU_BIN": "/nonexistent"}),
    p("E75", 2, "not a directory", "ephemeral", "run", "--log-dir", f"{OUT}/foreign.raw", IMG),
    p("E78", 1, "--add-swap", "ephemeral", "run", "--add-swap", "20T", IMG),
    # QEMU dies at once / never answers: the disk and log dir bcvk made go, and
    # the hint names no file that teardown removed.
    p("F01", 1, "stopped during boot", "ephemeral", "run", "--mount-disk-file",
      f"{OUT}/f01.img:data", "--add-swap", "64M", "--log-dir", f"{OUT}/f01logs", IMG,
      env={"QEMU_BIN": "/bin/false"}),
    p("F02", 1, "did not answer SSH", "ephemeral", "run-ssh", "--ssh-timeout", "4", IMG, "true",
      env={"QEMU_BIN": "{OUT}/fakeqemu"}),
    # ----------------------------------------------------------- to-disk
    p("T01", 1, "not in local storage", "to-disk", "localhost/bcvk/nonexistent:1",
      f"{OUT}/t01.raw"),
    p("T02", 2, "invalid image reference", "to-disk", "--", "-rf", f"{OUT}/t02.raw"),
    p("T03", 1, "does not exist", "to-disk", IMG, "/nonexistent/out.raw"),
    p("T05", 2, "directory", "to-disk", IMG, OUT),
    p("T06", 1, "bcvk did not create it", "to-disk", IMG, f"{OUT}/foreign.raw"),
    p("T07", 1, "not a regular file", "to-disk", IMG, f"{OUT}/link.raw"),
    p("T08", 1, "not a regular file", "to-disk", IMG, f"{OUT}/dangling.raw"),
    p("T09", 2, "--format", "to-disk", IMG, f"{OUT}/t09.raw", "--format", "bogus"),
    p("T10", 2, "--filesystem", "to-disk", IMG, f"{OUT}/t10.raw", "--filesystem", "zfs"),
    p("T11", 2, "too small", "to-disk", IMG, f"{OUT}/t11.raw", "--disk-size", "1M"),
    p("T12", 2, "--disk-size", "to-disk", IMG, f"{OUT}/t12.raw", "--disk-size", "0"),
    p("T14", 2, "--disk-size", "to-disk", IMG, f"{OUT}/t14.raw", "--disk-size", HUGE),
    p("T15", 2, "--disk-size", "to-disk", IMG, f"{OUT}/t15.raw", "--disk-size", "100P"),
    p("T17", 2, "kernel argument", "to-disk", IMG, f"{OUT}/t17.raw", "--karg", "a\nb"),
    p("T19", 2, "kernel argument", "to-disk", IMG, f"{OUT}/t19.raw", "--karg", "a\tb\x1b[31m",
      "--dry-run"),
    p("T20", 2, "--install-log", "to-disk", IMG, f"{OUT}/t20.raw", "--install-log", "x;rm -rf /"),
    p("T21", 2, "--compress", "to-disk", IMG, f"{OUT}/t21.raw", "--compress"),
    p("T22", 2, "--firmware bios", "to-disk", IMG, f"{OUT}/t22.raw", "--firmware", "bios"),
    p("T23", 2, "--root-ssh-authorized-keys", "to-disk", IMG, f"{OUT}/t23.raw",
      "--root-ssh-authorized-keys", "/nonexistent"),
    p("T24", 2, "private key", "to-disk", IMG, f"{OUT}/t24.raw", "--root-ssh-authorized-keys",
      f"{OUT}/testkey", "--dry-run"),
    p("T25", 2, "--partition-table mbr", "to-disk", IMG, f"{OUT}/t25.raw", "--installer", "bootc",
      "--partition-table", "mbr"),
    p("T26", 1, "not a bootc image", "to-disk", "{not-bootc}", f"{OUT}/t26.raw"),
    p("T27", 1, "no kernel found", "to-disk", "{no-kernel}", f"{OUT}/t27.raw"),
    p("T28", 1, "found 2 kernels", "to-disk", "{two-kernels}", f"{OUT}/t28.raw"),
    p("T31", 2, "too long", "to-disk", IMG, f"{OUT}/{LONG}.raw"),
    p("T31b", 2, "too long", "to-disk", IMG, f"{OUT}/{'b' * 245}.raw"),
    p("T34", 1, "/proc", "to-disk", IMG, "/proc/t34.raw"),
    p("T35", 2, "--disk-size", "to-disk", IMG, f"{OUT}/t35.qcow2", "--disk-size", "20000T"),
    p("T36", 2, "--root-size", "to-disk", IMG, f"{OUT}/t36.raw", "--root-size", HUGE),
    p("T37", 2, "invalid image reference", "to-disk", "docker://-rf", f"{OUT}/t37.raw"),
    p("T38", 1, "bcvk did not create it", "to-disk", IMG, f"{OUT}/foreign.raw", "--dry-run"),
    p("T39", 2, "--compress", "to-disk", IMG, f"{OUT}/t39.ova", "--compress"),
    p("T43", 2, "too long", "to-disk", IMG, f"{OUT}/{'o' * 96}.ova"),
    p("T44", 1, "bootc", "to-disk", IMG, f"{OUT}/t44.raw", "--installer", "bootc"),
    # ------------------------------------------ libvirt, checked offline
    p("L04", 2, "invalid VM name", "libvirt", "-c",
      "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "run", "--name", "-rf", IMG),
    p("L05", 2, "invalid VM name", "libvirt", "-c",
      "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "run", "--name", "../x", IMG),
    p("L05n", 2, "invalid VM name", "libvirt", "-c",
      "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "run", "--name", "ok\n", IMG),
    p("L06", 2, "invalid label", "libvirt", "-c",
      "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "run", "--label", "a,b", IMG),
    p("L06c", 2, "invalid label", "libvirt", "-c",
      "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "run", "--label", "a\x01", IMG),
    p("L07", 2, "--memory", "libvirt", "-c", "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
      "run", "--memory", HUGE, IMG),
    p("L08", 2, "--cpus", "libvirt", "-c", "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
      "run", "--cpus", "0", IMG),
    p("L08b", 2, "--cpus", "libvirt", "-c", "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
      "run", "--cpus", "100000", IMG),
    p("L09", 2, "port", "libvirt", "-c", "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
      "run", "-p", "0:1", IMG),
    p("L10", 2, "no such directory", "libvirt", "-c",
      "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "run", "--bind", "/nonexistent:/mnt",
      IMG),
    p("L11", 2, "--disk-size", "libvirt", "-c",
      "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "run", "--disk-size", "1K", IMG),
    p("L16", 2, "invalid VM name", "libvirt", "-c",
      "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "rm", "--", "-rf"),
    p("L21", 2, "volume name", "libvirt", "-c",
      "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "upload", IMG, "--volume-name",
      "a/b"),
    p("L22", 2, "volume name", "libvirt", "-c",
      "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "upload", IMG, "--volume-name",
      "<x>"),
    p("L25", 2, "URI", "libvirt", "-c", "qemu://host:99999/system", "list"),
    p("L26", 2, "--cpus", "libvirt", "-c", "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
      "run", "--cpus", "abc", IMG),
    p("L27", 2, "--timeout", "libvirt", "-c",
      "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "run", "--timeout", "nan", "--name",
      "ok", IMG),
    p("L27n", 2, "--timeout", "libvirt", "-c",
      "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "run", "--timeout", "-1", IMG),
    p("L28", 2, "--disk-size", "libvirt", "-c",
      "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "upload", IMG, "--disk-size", HUGE),
    p("L29", 1, "cannot connect", "libvirt", "-c",
      "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "list"),
    p("L31", 2, "kernel argument", "libvirt", "-c",
      "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "run", "--karg", "a\x1bb", IMG),
    p("L32", 2, "does not exist", "libvirt", "-c",
      "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "run", "--log-dir",
      "journal=/nonexistent/a/b", IMG),
    p("L33", 2, "both name the console's log", "libvirt", "-c",
      "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "run", "--log-dir", OUT,
      "--console-log", f"{OUT}/c.log", IMG),
    p("L34", 2, "remote host", "libvirt", "-c", "qemu+ssh://nobody@host.invalid/system", "run",
      "--bind-storage-ro", IMG),
    p("L35", 2, "invalid --log-dir", "libvirt", "-c",
      "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "run", "--log-dir", f"kmsg={OUT}",
      IMG),
    # ------------------------------------- libvirt, with the test driver
    p("V02", 1, "not created by bcvk", "libvirt", "-c", "test:///default", "rm", "-f", "test"),
    p("V03", 1, "not created by bcvk", "libvirt", "-c", "test:///default", "inspect", "test"),
    p("V08", 1, "bcvk did not create it", "libvirt", "-c", "test:///default", "run", "--name",
      "test", "--replace", IMG),
    p("V10", 1, "--ssh-key", "libvirt", "-c", "test:///default", "run", "--ssh-key", "/nonexistent",
      IMG),
    p("V16", 2, "--firmware bios", "libvirt", "-c", "test:///default", "run", "--firmware", "bios",
      IMG),
    p("V17", 1, "not created by bcvk", "libvirt", "-c", "test:///default", "ssh", "test", "--",
      "true"),
    p("V18", 1, "not a bootc image", "libvirt", "-c", "test:///default", "run", "{unlabelled}"),
    p("V19", 2, "instance type", "libvirt", "-c", "test:///default", "run", "--itype", "u1.nope",
      IMG),
    p("V27", 1, "no domain named", "libvirt", "-c", "test:///default", "ssh", "nosuchvm"),
    # ---------------------------------------------------------------- pb
    p("P02", 2, "invalid image reference", "pb", "-c",
      "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "run", "--", "-rf"),
    p("P03", 2, "invalid VM name", "pb", "-c",
      "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "run", "--name", "-rf", IMG),
    p("P04", 2, "podman-bootc-", "pb", "-c", "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
      "run", "--name", "podman-bootc-abc", IMG),
    p("P05", 2, "invalid user name", "pb", "-c",
      "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "run", "-u", "-oProxyCommand=touch x",
      IMG),
    p("P06", 2, "invalid user name", "pb", "-c",
      "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "run", "-u", "bob\n", IMG),
    p("P07", 1, "no such directory", "pb", "-c",
      "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "run", "--cloudinit", "/nonexistent",
      IMG),
    p("P08", 2, "user-data", "pb", "-c", "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
      "run", "--cloudinit", f"{OUT}/ci-empty", IMG),
    p("P09", 2, "absolute", "pb", "-c", "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
      "run", "-v", "/tmp:relative", IMG),
    p("P10", 2, "port", "pb", "-c", "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "run",
      "-p", "0:1", IMG),
    p("P11", 2, "--cpus", "pb", "-c", "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "run",
      "--cpus", "0", IMG),
    p("P12", 2, "--memory", "pb", "-c", "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
      "run", "--memory", HUGE, IMG),
    p("P13", 2, "--rm", "pb", "-c", "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "run",
      "--rm", "-B", IMG),
    p("P14", 2, "--disk-size", "pb", "-c", "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
      "run", "--disk-size", "-5", IMG),
    p("P17", 2, "invalid user name", "pb", "-c",
      "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "ssh", "-u", "-oProxyCommand=touch x",
      "0123456789ab", "--", "true"),
    p("P18", 2, "--all", "pb", "-c", "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "rm"),
    p("P26", 2, "bogus", "pb", "completion", "bogus"),
    p("P30", 2, "invalid VM name", "pb", "-c",
      "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "run", "--name", "../x", IMG),
    p("P31", 2, "no such directory", "pb", "-c",
      "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "run", "-v", "/nonexistent:/mnt",
      IMG),
    p("P33", 2, "--filesystem", "pb", "-c", "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
      "run", "--filesystem", "zfs", IMG),
    p("P34", 2, "--timeout", "pb", "-c", "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
      "run", "--timeout", "-1", IMG),
    p("P35", 1, "no podman-bootc VM", "pb", "-c", "test:///default", "ssh", "0123456789ab", "--",
      "true"),
]
# fmt: on


@dataclass
class Env:
    out: Path  # the probe's working directory, with the files the table names
    runtime: Path
    token: str
    refs: dict[str, str]

    def expand(self, arg: str) -> str:
        for key, value in {"IMG": DEMO_IMAGE, "OUT": str(self.out), **self.refs}.items():
            arg = arg.replace("{" + key + "}", value)
        return arg


def snapshot(*roots: Path) -> set[str]:
    """Every path under ROOTS (not following links), as text."""
    found: set[str] = set()
    for root in roots:
        if not root.exists():
            continue
        for directory, dirs, files in os.walk(root):
            found.update(os.path.join(directory, n) for n in (*dirs, *files))
    return found


# bcvk's runtime directory itself, made on first use like ~/.cache/bcvk: the
# VM registry with its lock, and the directory that per-output locks come
# and go in.  Anything else there (a VM's state dir, a lock file) is a leftover.
SKELETON = {"bcvk", "bcvk/ephemeral", "bcvk/ephemeral/.lock", "bcvk/locks"}


def watched(env: Env) -> set[str]:
    home = Path.home()
    bcvk_tmp = {str(p) for p in Path("/var/tmp").glob("bcvk-*")}
    skeleton = {str(env.runtime / s) for s in SKELETON}
    found = snapshot(
        env.out, env.runtime, home / ".local/share/bcvk", Path("/var/lib/libvirt/images")
    )
    return (found | bcvk_tmp) - skeleton


@pytest.fixture(scope="module")
def refs() -> dict[str, str]:
    missing = [ref for ref in (DEMO_IMAGE, *FIXTURES.values()) if not image_exists(ref)]
    if missing:
        pytest.fail(f"images missing: {missing} (run `make images`)")
    return dict(FIXTURES)


@pytest.fixture
def env(tmp_path: Path, refs: dict[str, str]) -> Env:
    out = tmp_path / "out"
    out.mkdir()
    (out / "foreign.raw").write_text("not bcvk's\n")
    (out / "link.raw").symlink_to(out / "foreign.raw")
    (out / "dangling.raw").symlink_to(out / "nowhere")
    (out / "ci-empty").mkdir()
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(out / "testkey")], check=True
    )
    (out / "fakeqemu").write_text("#!/bin/sh\nexec sleep 120\n")
    (out / "fakeqemu").chmod(0o755)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    return Env(out, runtime, secrets.token_hex(8), refs)


def test_the_table_covers_every_command_group() -> None:
    groups = {probe.args[0] if probe.args[0] not in ("-c",) else "" for probe in PROBES}
    assert {"images", "ephemeral", "to-disk", "libvirt", "pb"} <= groups
    assert len({probe.id for probe in PROBES}) == len(PROBES)


@pytest.mark.parametrize("probe", PROBES, ids=[probe.id for probe in PROBES])
def test_bad_input_is_one_error_and_a_hint_and_leaves_nothing(probe: Probe, env: Env) -> None:
    args = [env.expand(a) for a in probe.args]
    before, mounts = watched(env), mount_counts()
    foreign = (env.out / "foreign.raw").read_text()
    result = bcvk(
        *args,
        env={
            "XDG_RUNTIME_DIR": str(env.runtime),
            "BCVK_TEST_MARK": env.token,
            **{k: env.expand(v) for k, v in probe.env},
        },
        timeout=600,
        input="",
    )
    stderr = result.stderr
    assert "Traceback" not in stderr, stderr
    assert "Traceback" not in result.stdout, result.stdout
    assert result.returncode == probe.rc, stderr
    lines = stderr.splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert probe.expect in lines[errors[0]], stderr
    hints = [line for line in lines[errors[0] :] if line.startswith("hint: ")]
    assert len(hints) == 1, stderr
    assert len(hints[0]) > len("hint: ") + 5, stderr
    # A hint never names a file that is gone by the time it is read.
    for word in hints[0].split():
        path = word.strip("`'\",;:()")
        if path.startswith(str(env.out)) or path.startswith(str(env.runtime)):
            assert os.path.lexists(path), f"the hint names {path}, which does not exist"
    # Nothing left behind, and nothing of the user's touched.
    assert marked_processes(env.token) == []
    after = mount_counts()
    assert [layer for layer, n in after.items() if n > mounts.get(layer, 0)] == [], after
    assert sorted(watched(env) - before) == []
    assert sorted(before - watched(env)) == []
    assert (env.out / "foreign.raw").read_text() == foreign
    assert stat.S_ISLNK((env.out / "link.raw").lstat().st_mode)


@pytest.mark.parametrize(
    ("output", "expect"),
    [("/usr/t41.raw", "cannot create files"), ("/root/t42.raw", "cannot use OUTPUT")],
)
def test_unwritable_output_as_a_user(rootless_user: str, output: str, expect: str) -> None:
    """T41/T42: a user's OUTPUT in a directory they cannot write, or cannot even see into."""
    result = bcvk("to-disk", DEMO_IMAGE, output, user=rootless_user)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert expect in errors[0], result.stderr
    assert "hint:" in result.stderr
    assert not Path(output).exists()
