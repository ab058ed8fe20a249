"""What a warm-startable guest runs, and the lines bcvk hands a restored guest.

A snapshot is saved from a cold-booted VM once SSH answers.  Before it is
saved, ``prepare_script`` (run over SSH) starts a small agent on the
virtio-serial port ``org.bcvk.control`` and removes that VM's key from
root's ``authorized_keys``: the saved machine lets nobody in.  Every VM
restored from it is paused until bcvk has handed the agent, over the port,
its own public key, the host's clock and its own hostname
(``hand_in_lines``); the agent answers ``ok`` once they are in place.

Everything here is text for the guest, built without touching the host.
"""

from __future__ import annotations

import re
import shlex

from bcvk.host.qemu import CONTROL_PORT

AGENT_UNIT = "bcvk-control"
AGENT_PATH = "/run/bcvk/control.sh"
PORT_PATH = f"/dev/virtio-ports/{CONTROL_PORT}"
AUTHORIZED_KEYS = "/root/.ssh/authorized_keys"
READY = "ok"

# A key line as ssh-keygen writes it: type, base64, an optional comment of
# printable characters.  Checked so no line can smuggle a second command.
_KEY_RE = re.compile(r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp\d+) [A-Za-z0-9+/=]+( [!-~]+)?")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")

# The agent runs in the guest as root.  When no host end is connected, a
# read of a virtio-serial port returns end-of-file at once: it reopens the
# port and tries again.  Lines it does not know are ignored.
AGENT = f"""\
#!/bin/sh
# bcvk warm-start agent: takes a key, the clock and a hostname from the host.
port={PORT_PATH}
while :; do
  if exec 3<>"$port"; then
    while IFS= read -r line <&3; do
      case $line in
        "key "*)
          umask 077
          [ -d /root/.ssh ] || mkdir /root/.ssh
          printf '%s\\n' "${{line#key }}" >> {AUTHORIZED_KEYS} ;;
        "clock "*) date -u -s "@${{line#clock }}" > /dev/null ;;
        "hostname "*) printf '%s' "${{line#hostname }}" > /proc/sys/kernel/hostname ;;
        go) printf '{READY}\\n' >&3 ;;
      esac
    done
    exec 3<&-
  fi
  sleep 0.1
done
"""


def check_key(public_key: str) -> str:
    key = public_key.strip()
    if not _KEY_RE.fullmatch(key):
        raise ValueError("not an SSH public key line")
    return key


def prepare_script(public_key: str) -> str:
    """The shell script (for ``ssh … SCRIPT``) that readies a VM for its snapshot.

    It fails, changing nothing else, when the agent cannot start or the port
    is missing; only then does it remove PUBLIC_KEY from authorized_keys.
    """
    key = shlex.quote(check_key(public_key))
    return f"""\
set -eu
[ -e {PORT_PATH} ] || {{ echo "no {PORT_PATH} in the guest" >&2; exit 1; }}
mkdir -p -m 0700 /run/bcvk
cat > {AGENT_PATH} <<'BCVK_AGENT'
{AGENT}BCVK_AGENT
chmod 0700 {AGENT_PATH}
systemd-run --quiet --collect --unit={AGENT_UNIT} /bin/sh {AGENT_PATH}
i=0
until systemctl is-active --quiet {AGENT_UNIT}; do
  i=$((i + 1))
  [ "$i" -lt 100 ] || {{ echo "{AGENT_UNIT} did not start" >&2; exit 1; }}
  sleep 0.1
done
keys={AUTHORIZED_KEYS}
grep -vxF -e {key} "$keys" > "$keys.bcvk" || :
cat "$keys.bcvk" > "$keys"
rm -f "$keys.bcvk"
if grep -qxF -e {key} "$keys"; then echo "the key is still in $keys" >&2; exit 1; fi
"""


def identity_lines(public_key: str, hostname: str) -> bytes:
    """The VM's own key and hostname, for its control port (sendable before it runs)."""
    if not _HOSTNAME_RE.fullmatch(hostname):
        raise ValueError(f"invalid hostname {hostname!r}")
    return f"key {check_key(public_key)}\nhostname {hostname}\n".encode()


def go_lines(clock: float) -> bytes:
    """The host's clock (sent once the VM runs, so it is current), then ``go``."""
    return f"clock {clock:.3f}\ngo\n".encode()


def hand_in_lines(public_key: str, clock: float, hostname: str) -> bytes:
    """Everything bcvk writes to a restored guest's control port, ending with ``go``."""
    return identity_lines(public_key, hostname) + go_lines(clock)
