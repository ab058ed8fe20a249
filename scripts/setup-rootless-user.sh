#!/usr/bin/env bash
# Create (idempotently) the unprivileged user that rootless bcvk tests run
# as, make its podman work on this kind of host, and copy bcvk's local images
# (scripts/build-images.sh) from root's store into the user's store.
#
# Usage: scripts/setup-rootless-user.sh        (as root; BCVK_TEST_USER overrides the name)
#
# What the user's environment needs (all set up here; nothing to export):
#   - /etc/subuid + /etc/subgid ranges and `uidmap` (newuidmap/newgidmap) for
#     the user namespace podman creates.
#   - ~/.config/containers/storage.conf: driver "vfs". overlay needs
#     fuse-overlayfs or a kernel allowing rootless overlay; vfs always works
#     (costs disk: each layer is a full copy).
#   - ~/.config/containers/containers.conf: cgroup_manager "cgroupfs" and
#     events_logger "file": there is no systemd/logind, so no user session
#     bus and no journald.
#   - XDG_RUNTIME_DIR: not set by `su`/`ssh` here (no logind) and it need
#     not be. This script creates /run/user/$UID (0700, owned by the user),
#     as logind would: podman 4.3 uses it for libpod/ and crun/ state when
#     XDG_RUNTIME_DIR is unset, and bcvk's runtime-dir fallback
#     (docs/ARCHITECTURE.md) finds it too. Storage runroot: /tmp/containers-user-$UID.
#   - HOME must be the user's home (so podman reads ~/.config/containers):
#     use `su - bcvk-test -c ...` (or runuser -l), not plain `su bcvk-test`.
#   - rootless `podman image mount` only works inside the user namespace:
#       su - bcvk-test -c 'podman unshare podman image mount IMAGE'
#   - membership of group kvm (if the group exists) for /dev/kvm.
set -euo pipefail

USER_NAME=${BCVK_TEST_USER:-bcvk-test}
HOME_DIR=/home/$USER_NAME
IMAGES=(
    localhost/bcvk/debian-bootc:12
    localhost/bcvk/fixture-not-bootc:latest
    localhost/bcvk/fixture-unlabelled:latest
    localhost/bcvk/fixture-no-kernel:latest
    localhost/bcvk/fixture-two-kernels:latest
)

log() { printf 'setup-rootless-user: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
as_user() { su - "$USER_NAME" -s /bin/sh -c "$1"; }

[[ $(id -u) == 0 ]] || die "must run as root"
for tool in useradd usermod newuidmap newgidmap podman su; do
    command -v "$tool" >/dev/null || die "$tool not found (see scripts/host-packages.txt: uidmap, podman)"
done

# --- user ---------------------------------------------------------------------
if ! id "$USER_NAME" >/dev/null 2>&1; then
    useradd --create-home --home-dir "$HOME_DIR" --shell /bin/bash \
        --comment "bcvk rootless tests" "$USER_NAME"
    log "created user $USER_NAME"
fi
if getent group kvm >/dev/null && ! id -nG "$USER_NAME" | grep -qw kvm; then
    usermod -aG kvm "$USER_NAME"
fi
uid=$(id -u "$USER_NAME")
gid=$(id -g "$USER_NAME")

# --- subordinate ids: 65536 each, after the highest range already in use ---------
for f in /etc/subuid /etc/subgid; do
    touch "$f"
    if ! grep -q "^$USER_NAME:" "$f"; then
        start=$(awk -F: 'BEGIN { m = 100000 } { e = $2 + $3; if (e > m) m = e } END { print m }' "$f")
        echo "$USER_NAME:$start:65536" >>"$f"
        log "added $USER_NAME:$start:65536 to $f"
    fi
done

# --- runtime dir (what logind would have made) -------------------------------------
install -d -m 0700 -o "$uid" -g "$gid" "/run/user/$uid" 2>/dev/null ||
    log "warning: could not create /run/user/$uid; podman uses /tmp/podman-run-$uid"

# --- podman configuration -----------------------------------------------------
cfg=$HOME_DIR/.config/containers
install -d -m 0755 -o "$uid" -g "$gid" "$HOME_DIR/.config" "$cfg"
write_cfg() { # FILE CONTENT: (re)write only when different
    if [[ ! -f $1 || $(cat "$1") != "$2" ]]; then
        printf '%s\n' "$2" >"$1"
        chown "$uid:$gid" "$1"
        log "wrote $1"
    fi
}
write_cfg "$cfg/storage.conf" "# written by bcvk scripts/setup-rootless-user.sh
[storage]
driver = \"vfs\""
write_cfg "$cfg/containers.conf" "# written by bcvk scripts/setup-rootless-user.sh
# no systemd user session and no journald on this host
[engine]
cgroup_manager = \"cgroupfs\"
events_logger = \"file\""

# a store created with another driver cannot be reused: reset it if so
driver=$(as_user "podman info --format '{{.Store.GraphDriverName}}'" 2>/dev/null || true)
if [[ -n $driver && $driver != vfs ]]; then
    log "user store uses driver '$driver'; resetting it for vfs"
    as_user "podman system reset --force" >/dev/null 2>&1 || true
fi
as_user "podman system migrate" >/dev/null 2>&1 || true # picks up new subuid ranges

# --- images ----------------------------------------------------------------------
for img in "${IMAGES[@]}"; do
    root_id=$(podman image inspect --format '{{.Id}}' "$img" 2>/dev/null) ||
        die "$img is not in root's store (run scripts/build-images.sh first)"
    user_id=$(as_user "podman image inspect --format '{{.Id}}' '$img'" 2>/dev/null || true)
    if [[ $user_id == "$root_id" ]]; then
        log "$img is up to date in $USER_NAME's store"
        continue
    fi
    t=$(date +%s)
    podman save --format docker-archive "$img" | as_user "podman load -q" >/dev/null ||
        die "copying $img to $USER_NAME's store failed"
    log "$img copied to $USER_NAME's store ($(($(date +%s) - t))s)"
done
# drop the user's copies that newer builds replaced (untagged bcvk images),
# except those still mounted by a running rootless VM
mounted=$(as_user "podman unshare podman image mount --format json" 2>/dev/null || true)
for id in $(as_user "podman images -q --no-trunc --filter dangling=true --filter label=io.bcvk.recipe-hash"); do
    id=${id#sha256:}
    grep -q "$id" <<<"$mounted" && continue
    as_user "podman rmi $id" >/dev/null 2>&1 || true
done

# --- check ------------------------------------------------------------------------
as_user "podman unshare sh -c 'm=\$(podman image mount ${IMAGES[0]}) && test -x \"\$m/sbin/init\"; r=\$?; podman image unmount ${IMAGES[0]} >/dev/null; exit \$r'" ||
    die "rootless 'podman unshare podman image mount' failed for $USER_NAME"
log "ok: $USER_NAME can list and mount the images (rootless, vfs)"
