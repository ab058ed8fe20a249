#!/usr/bin/env bash
# Build localhost/bcvk/fixture-bootc-installer:latest: the demo image plus a
# STAND-IN /usr/bin/bootc, for testing the plumbing of
# `bcvk to-disk --installer bootc` on hosts where no real bootc exists.
#
# The stand-in is NOT bootc.  It accepts `bootc install to-disk ... DEVICE`,
# checks the flags bcvk must pass, prints progress lines like bootc does,
# and formats DEVICE as one ext4 filesystem labelled "bootc-standin" holding
# install-args.txt (its exact arguments), os-release and guest-evidence.txt
# (what the installer VM looked like while it ran: swap, /var/tmp, whether
# multi-user.target and the image's own bcvk-fixture-user.service ran).
# The disk boots no OS: its sector 0 is an MBR boot sector (ext4 leaves bytes
# 0-1023 unused) that prints BCVK-STANDIN-BIOS-BOOT on COM1 and halts, so a
# BIOS VM can show it booted the disk.  With the kernel argument
# `bcvk.standin.fail` among its --karg values it fails with an error
# message, to test error propagation.
#
# Built without `podman run`/`podman build` (they do not work on these
# hosts): podman image mount + tar + podman import.  Idempotent: rebuilt only
# when the demo image or this script changed (label io.bcvk.fixture-hash).
#
# Usage: scripts/build-installer-fixture.sh   (as root, after scripts/build-images.sh)
set -euo pipefail

DEMO=localhost/bcvk/debian-bootc:12
FIXTURE=localhost/bcvk/fixture-bootc-installer:latest
log() { printf 'build-installer-fixture: %s\n' "$*" >&2; }

[[ $(id -u) == 0 ]] || { log "error: must run as root"; exit 1; }
podman image exists "$DEMO" || { log "error: $DEMO missing: run scripts/build-images.sh"; exit 1; }

demo_id=$(podman image inspect --format '{{.Id}}' "$DEMO")
hash=$( (echo "$demo_id"; cat "${BASH_SOURCE[0]}") | sha256sum | cut -c1-64)
current=$(podman image inspect --format '{{index .Labels "io.bcvk.fixture-hash"}}' "$FIXTURE" 2>/dev/null || true)
if [[ $current == "$hash" ]]; then
    log "$FIXTURE is up to date"
    exit 0
fi

work=$(mktemp -d /var/tmp/bcvk-installer-fixture.XXXXXX)
cleanup() {
    podman image unmount "$DEMO" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/add/usr/bin" "$work/add/usr/lib/bcvk-standin" \
    "$work/add/etc/systemd/system/multi-user.target.wants"
# 16-bit real mode at 0x7c00: ds=0, si=the message, out dx,al per byte to
# COM1 (0x3f8; QEMU's UART needs no setup), then hlt forever.  The message
# starts at offset 0x17, right after the 23 bytes of code.
{
    printf '\xfa\xfc\x31\xc0\x8e\xd8\xbe\x17\x7c\xba\xf8\x03'  # cli cld; ds=0; si; dx
    printf '\xac\x84\xc0\x74\x03\xee\xeb\xf8'                  # lodsb; jz done; out; jmp
    printf '\xf4\xeb\xfd'                                      # done: hlt; jmp done
    printf 'BCVK-STANDIN-BIOS-BOOT\r\n\0'
} >"$work/add/usr/lib/bcvk-standin/mbr.bin"
truncate -s 510 "$work/add/usr/lib/bcvk-standin/mbr.bin"
printf '\x55\xaa' >>"$work/add/usr/lib/bcvk-standin/mbr.bin"
[[ $(stat -c %s "$work/add/usr/lib/bcvk-standin/mbr.bin") == 512 ]] || { log "error: MBR is not 512 bytes"; exit 1; }

# A service of the image's own, as a quadlet would be: the installer VM's
# boot target must not start it.
cat > "$work/add/etc/systemd/system/bcvk-fixture-user.service" <<'UNIT'
[Unit]
Description=bcvk fixture: the image's own service (the installer VM must not start it)

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/touch /run/bcvk-fixture-user-ran

[Install]
WantedBy=multi-user.target
UNIT
ln -s ../bcvk-fixture-user.service \
    "$work/add/etc/systemd/system/multi-user.target.wants/bcvk-fixture-user.service"
cat > "$work/add/usr/bin/bootc" <<'STANDIN'
#!/bin/bash
# bcvk test STAND-IN for bootc (scripts/build-installer-fixture.sh). Not bootc.
set -euo pipefail
echo "bootc stand-in (bcvk test fixture): $*"
echo "bootc stand-in: RUST_LOG=${RUST_LOG:-unset}"
[[ ${1:-} == install && ${2:-} == to-disk ]] || { echo "error: stand-in only knows 'install to-disk'" >&2; exit 2; }
shift 2
device=${*: -1}
args=("$@")
for required in --generic-image --skip-fetch-check; do
    [[ " ${args[*]} " == *" $required "* ]] || { echo "error: missing $required" >&2; exit 2; }
done
for arg in "${args[@]}"; do
    if [[ $arg == --karg=bcvk.standin.fail || $arg == bcvk.standin.fail ]]; then
        echo "error: Installing to disk: stand-in failure requested by bcvk.standin.fail" >&2
        exit 1
    fi
done
[[ -b $device ]] || { echo "error: $device is not a block device" >&2; exit 1; }
echo "Installing image: stand-in to $device"
root=$(mktemp -d)
printf '%s\n' "install to-disk ${args[*]}" > "$root/install-args.txt"
cp /etc/os-release "$root/os-release"
{
    echo "swaps:"
    tail -n +2 /proc/swaps
    echo "var-tmp: $(findmnt -rnbo SIZE,FSTYPE /var/tmp || echo none)"
    echo "multi-user.target: $(systemctl is-active multi-user.target || true)"
    if [[ -e /run/bcvk-fixture-user-ran ]]; then echo "fixture-user: ran"; else echo "fixture-user: not run"; fi
} > "$root/guest-evidence.txt"
sed 's/^/bootc stand-in: evidence: /' "$root/guest-evidence.txt"
mkfs.ext4 -q -F -L bootc-standin -d "$root" "$device"
dd if=/usr/lib/bcvk-standin/mbr.bin of="$device" bs=512 count=1 conv=fsync status=none
sync
echo "Installation complete!"
STANDIN
chmod 0755 "$work/add/usr/bin/bootc"

tree=$(podman image mount "$DEMO")
log "archiving $DEMO"
tar -C "$tree" --numeric-owner --xattrs --xattrs-include='*' --acls -cf "$work/image.tar" .
tar -C "$work/add" --numeric-owner --owner=0 --group=0 -rf "$work/image.tar" ./usr/bin/bootc \
    ./usr/lib/bcvk-standin ./etc/systemd/system/bcvk-fixture-user.service \
    ./etc/systemd/system/multi-user.target.wants/bcvk-fixture-user.service
podman image unmount "$DEMO" >/dev/null

log "importing $FIXTURE"
previous=$(podman image inspect --format '{{.Id}}' "$FIXTURE" 2>/dev/null || true)
podman import --quiet \
    --change "LABEL=containers.bootc=1" \
    --change "LABEL=io.bcvk.fixture-hash=$hash" \
    --change 'CMD ["/sbin/init"]' \
    "$work/image.tar" "$FIXTURE" >/dev/null
# The tag moved to the new image: the old one is this script's, now nameless.
if [[ -n $previous ]] && [[ -z $(podman image inspect --format '{{.RepoTags}}' "$previous" 2>/dev/null | tr -d '[]') ]]; then
    podman rmi "$previous" >/dev/null 2>&1 || log "note: could not remove the previous fixture $previous"
fi
log "built $FIXTURE"
