"""SSH key pairs, the one ssh argv builder, and readiness checks."""

from __future__ import annotations

import base64
import binascii
import os
import re
import shlex
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bcvk import run
from bcvk.errors import BcvkError, UsageError
from bcvk.values import is_vm_name, validate_user

# Fixed options: throwaway guests get new host keys every boot, so host-key
# checking can only get in the way; BatchMode stops password prompts from
# hanging readiness polls.
BASE_OPTIONS = (
    "-F", "none",
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "IdentitiesOnly=yes",
    "-o", "BatchMode=yes",
    "-o", "ServerAliveInterval=5",
    "-o", "ServerAliveCountMax=6",
)  # fmt: skip


@dataclass(frozen=True)
class KeyPair:
    private: Path

    @property
    def public(self) -> Path:
        return self.private.with_name(self.private.name + ".pub")

    def public_text(self) -> str:
        return self.public.read_text().strip()


def generate_key(directory: Path, name: str = "id_ed25519", comment: str = "bcvk") -> KeyPair:
    """A fresh ed25519 key pair, private key 0600 in a 0700 directory."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    private = directory / name
    for path in (private, private.with_name(name + ".pub")):
        path.unlink(missing_ok=True)
    run.run(
        [run.require("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", private]
    )
    private.chmod(0o600)
    return KeyPair(private)


@dataclass(frozen=True)
class Target:
    """How to reach a guest's sshd."""

    port: int
    key: Path
    host: str = "127.0.0.1"
    user: str = "root"
    proxy_jump: str | None = None
    # A complete ProxyCommand (e.g. through a remote libvirt host), used
    # instead of proxy_jump when set: -J would hand our `-F none` to the jump.
    proxy_command: str | None = None
    connect_timeout: int = 5
    # The user's own `-o KEY=VALUE`s (`ssh --extra-options`): ssh takes the
    # first value it reads for an option, so these go before bcvk's defaults.
    options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # The user may come from a domain's metadata: it must never reach ssh
        # as something it reads as an option (-oProxyCommand=… runs a command).
        validate_user(self.user)
        if not self.host or self.host.startswith("-") or any(c.isspace() for c in self.host):
            raise UsageError(
                f"invalid SSH host {self.host!r}", hint="a host name or address, no '-' first"
            )


def _connection(tool: str, target: Target, port_flag: str) -> list[str]:
    """TOOL (ssh or scp) and the options that reach TARGET; the user's options
    first, so that they win over bcvk's."""
    args = [os.fspath(run.find_binary(tool) or tool)]
    for option in target.options:
        args += ["-o", option]
    args += BASE_OPTIONS
    args += ["-o", f"ConnectTimeout={target.connect_timeout}"]
    args += ["-i", os.fspath(target.key), port_flag, str(target.port)]
    if target.proxy_command:
        args += ["-o", f"ProxyCommand={target.proxy_command}"]
    elif target.proxy_jump:
        args += ["-J", target.proxy_jump]
    return args


def argv(
    target: Target,
    command: Sequence[str] = (),
    *,
    tty: bool | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The ssh command line for TARGET; a multi-word command is shell-quoted.

    ssh joins its arguments with spaces for the remote shell, so each word is
    quoted to survive that unless a single string was given (already a shell
    command line, as users type it).
    """
    args = _connection("ssh", target, "-p")
    if tty is True:
        args.append("-t")
    elif tty is False:
        args.append("-T")
    args += list(extra)
    # The user goes in -l and the host after --: neither can be read as an option.
    args += ["-l", target.user, "--", target.host]
    if command:
        args.append(command[0] if len(command) == 1 else shlex.join(command))
    return args


def scp_argv(target: Target, sources: Sequence[str], dest: str, *, recursive: bool) -> list[str]:
    """scp between here and TARGET; a remote side is ``REMOTE:PATH`` with REMOTE
    already replaced by ``scp_remote(target)``.  Paths never start an option:
    each comes after ``--``."""
    args = _connection("scp", target, "-P")
    if recursive:
        args.append("-r")
    return [*args, "--", *sources, dest]


def scp_remote(target: Target, path: str) -> str:
    return f"{target.user}@{target.host}:{path}"


def scp_side(text: str) -> tuple[str | None, str]:
    """``NAME:PATH`` → (NAME, PATH); anything else is a local path (``./a:b`` for a
    local name with a colon)."""
    name, colon, path = text.partition(":")
    if colon and is_vm_name(name):
        return name, path
    return None, text


def scp_endpoints(source: str, dest: str, flavour: str) -> tuple[str, str | None, str | None]:
    """The VM name and the (src, dst) paths of ``scp SRC DST``, one side ``NAME:PATH``;
    the remote side's path is returned, the local side's is None."""
    (src_vm, src_path), (dst_vm, dst_path) = scp_side(source), scp_side(dest)
    if (src_vm is None) == (dst_vm is None):
        raise UsageError(
            "exactly one of SRC and DST must be NAME:PATH"
            + (" (both are)" if src_vm else " (neither is)"),
            hint=f"e.g. `bcvk {flavour} scp NAME:/etc/os-release .` or `… ./file NAME:/tmp/`",
        )
    name = src_vm or dst_vm
    assert name is not None
    remote = src_path if src_vm else dst_path
    if not remote:
        raise UsageError(f"{name}: needs a path after the colon", hint="e.g. NAME:/tmp/")
    return name, remote if src_vm else None, remote if dst_vm else None


def copy(target: Target, source: str, dest: str, *, recursive: bool) -> int:
    """``scp SOURCE DEST`` where the remote side (already split off by
    ``scp_endpoints``) is on TARGET; returns scp's exit status."""
    src_vm, src = scp_side(source)
    dst = dest
    if src_vm is not None:
        src = scp_remote(target, src)
    else:
        dst = scp_remote(target, scp_side(dest)[1])
    argv = scp_argv(target, [src], dst, recursive=recursive)
    return int(run.run(argv, check=False, capture=False, stdout=1, stdin=0).returncode)


LOG_LEVELS = ("QUIET", "FATAL", "ERROR", "INFO", "VERBOSE", "DEBUG", "DEBUG1", "DEBUG2", "DEBUG3")
_OPTION_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*=[^\x00-\x1f\x7f]+")


def user_options(
    extra: Sequence[str] = (), *, strict_host_keys: bool = False, log_level: str | None = None
) -> tuple[str, ...]:
    """`-o` values for `ssh --extra-options K=V --strict-host-keys --log-level L` (checked)."""
    options: list[str] = []
    for text in extra:
        if not _OPTION_RE.fullmatch(text):
            raise UsageError(
                f"invalid SSH option {text!r}: expected KEY=VALUE",
                hint="e.g. --extra-options ServerAliveInterval=30 (see ssh_config(5))",
            )
        options.append(text)
    if log_level is not None:
        level = log_level.upper()
        if level not in LOG_LEVELS:
            raise UsageError(
                f"invalid SSH log level {log_level!r}", hint=f"one of: {', '.join(LOG_LEVELS)}"
            )
        options.append(f"LogLevel={level}")
    if strict_host_keys:
        # The user's known_hosts decides (a new VM's key is not in it yet).
        options += ["StrictHostKeyChecking=yes", "UserKnownHostsFile=~/.ssh/known_hosts"]
    return tuple(options)


def probe(target: Target) -> bool:
    """True when a real SSH handshake and a command succeed."""
    try:
        result = run.run(argv(target, ["true"], tty=False), check=False, timeout=30)
    except BcvkError:
        return False
    return result.returncode == 0


def banner(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> bool:
    """True when an SSH server on HOST:PORT sends its version banner.

    Cheaper than ``probe`` (no key exchange, which under TCG costs seconds):
    for a guest whose sshd is known to have been ready, it proves the
    forwarded port reaches a live sshd.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            return conn.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def execute(
    target: Target,
    command: Sequence[str],
    *,
    capture: bool = True,
    tty: bool | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run COMMAND in the guest and return its result (never raises on exit status)."""
    return run.run(
        argv(target, command, tty=tty),
        check=False,
        capture=capture,
        stdout=None if capture else 1,
        stdin=None if capture else 0,
        timeout=timeout,
    )


def interactive(target: Target, command: Sequence[str] = ()) -> int:
    """Run ssh attached to our terminal and return its exit status."""
    tty = None if command else True
    result = run.run(argv(target, command, tty=tty), check=False, capture=False, stdout=1, stdin=0)
    return int(result.returncode)


# ssh options that take a value (from ssh(1)).
_VALUE_OPTIONS = set("BbcDEeFIiJLlmOoPpQRSWw")


def split_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Leading ``-x``/``-o VALUE`` words are ssh options; the rest is the command."""
    options: list[str] = []
    words = list(args)
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--":
            return options, words[i + 1 :]
        if not word.startswith("-") or word == "-":
            break
        options.append(word)
        if len(word) == 2 and word[1] in _VALUE_OPTIONS:
            if i + 1 >= len(words):
                raise UsageError(
                    f"ssh option {word} needs a value", hint=f"e.g. {word} VALUE before the command"
                )
            options.append(words[i + 1])
            i += 1
        i += 1
    return options, words[i:]


KEY_TYPES = frozenset(
    {
        "ssh-ed25519", "ssh-rsa", "ssh-dss", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
    }
    | {f"{t}-cert-v01@openssh.com" for t in ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256")}
)  # fmt: skip


def public_key_line(line: str) -> bool:
    """Whether LINE is an authorized_keys entry: [options] TYPE BASE64 [comment]."""
    words = line.split()
    for i, word in enumerate(words[:-1]):
        if word in KEY_TYPES:
            try:
                blob = base64.b64decode(words[i + 1], validate=True)
            except (binascii.Error, ValueError):
                return False
            # The blob starts with its own type name, length-prefixed.
            return blob[4 : 4 + len(word)] == word.encode()
    return False


def check_authorized_keys(path: Path) -> str:
    """PATH's text, refusing anything that is not public keys (a private key above all)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(
            f"cannot read {path}: {exc}", hint="pass a readable text file of public keys"
        ) from None
    if "PRIVATE KEY" in text:
        raise UsageError(
            f"{path} holds a private key",
            hint="pass the public key (the .pub file); a private key must never go into a disk",
        )
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    bad = [n for n, ln in enumerate(lines, 1) if not public_key_line(ln)]
    if not lines or bad:
        raise UsageError(
            f"{path} is not a list of SSH public keys" + (f" (entry {bad[0]})" if bad else ""),
            hint="one public key per line, as in ~/.ssh/id_ed25519.pub or authorized_keys",
        )
    return text
