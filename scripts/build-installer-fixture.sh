#!/usr/bin/env bash
# Build localhost/bcvk/fixture-bootc-installer:latest: the demo image plus a
# STAND-IN /usr/bin/bootc, for testing the plumbing of
# `bcvk to-disk --installer bootc` on hosts where no real bootc exists.
#
# The stand-in is NOT bootc.  It accepts `bootc install to-disk ... DEVICE`,
# checks the flags bcvk must pass, prints progress lines like bootc does,
# and formats DEVICE as one ext4 filesystem labelled "bootc-standin" holding
# install-args.txt (its exact arguments) and os-release.  The disk it makes
# does not boot.  With the kernel argument `bcvk.standin.fail` among its
# --karg values it fails with an error message, to test error propagation.
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

mkdir -p "$work/add/usr/bin"
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
mkfs.ext4 -q -F -L bootc-standin -d "$root" "$device"
sync
echo "Installation complete!"
STANDIN
chmod 0755 "$work/add/usr/bin/bootc"

tree=$(podman image mount "$DEMO")
log "archiving $DEMO"
tar -C "$tree" --numeric-owner --xattrs --xattrs-include='*' --acls -cf "$work/image.tar" .
tar -C "$work/add" --numeric-owner --owner=0 --group=0 -rf "$work/image.tar" ./usr/bin/bootc
podman image unmount "$DEMO" >/dev/null

log "importing $FIXTURE"
podman import --quiet \
    --change "LABEL=containers.bootc=1" \
    --change "LABEL=io.bcvk.fixture-hash=$hash" \
    --change 'CMD ["/sbin/init"]' \
    "$work/image.tar" "$FIXTURE" >/dev/null
log "built $FIXTURE"
