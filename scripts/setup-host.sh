#!/bin/bash
# Install the host packages bcvk needs, skipping what is already there.
# Debian/Ubuntu only; on other distributions print what to install instead.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=()
while read -r pkg _; do
  [[ -z $pkg || $pkg == \#* ]] || packages+=("$pkg")
done < scripts/host-packages.txt

if ! command -v dpkg-query >/dev/null; then
  echo "Not a Debian-based host: install the equivalents of: ${packages[*]}" >&2
  echo "(Fedora: dnf install $(sed -n 's/^# fedora: //p' scripts/host-packages.txt))" >&2
  exit 0
fi

install_missing() {
  local missing=() pkg status
  for pkg in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [[ $status == installed ]] || missing+=("$pkg")
  done
  if ((${#missing[@]} == 0)); then
    echo "host packages: all ${#packages[@]} present" >&2
    return 0
  fi
  if ((EUID != 0)); then
    echo "missing packages (run as root to install): ${missing[*]}" >&2
    return 1
  fi
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Without a udev daemon (CI micro-VMs, containers) /dev/kvm keeps whatever
# group it came with, not the kvm group udev's rule gives it. When root can
# open it but libvirt's QEMU user cannot, libvirt 9 finds its cached QEMU
# capabilities invalid on every call and re-probes QEMU each time, so defining
# a domain takes minutes. `bcvk doctor` reports the same (libvirt-kvm-access).
kvm_device_group() {
  [[ -c /dev/kvm ]] && ((EUID == 0)) && getent group kvm >/dev/null || return 0
  local group
  group=$(stat -c %G /dev/kvm)
  if [[ $group != kvm ]]; then
    chgrp kvm /dev/kvm
    chmod g+rw /dev/kvm
    echo "host: /dev/kvm group $group -> kvm (as udev's rule would set it)" >&2
  fi
}

install_missing
kvm_device_group
