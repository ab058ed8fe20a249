#!/usr/bin/env bash
# Build bcvk's local test/demo images into root's podman store, from Debian
# packages only (no registry needed):
#
#   localhost/bcvk/debian-bootc:12            bootable (bootc-style) Debian 12
#   localhost/bcvk/fixture-not-bootc:latest   busybox app container, no label
#   localhost/bcvk/fixture-unlabelled:latest  demo content, no containers.bootc
#   localhost/bcvk/fixture-no-kernel:latest   demo minus kernels
#   localhost/bcvk/fixture-two-kernels:latest demo plus a second kernel dir
#   localhost/bcvk/debian-bootc-initramfs-tools:12  demo, initramfs-tools initramfs
#   localhost/bcvk/debian-bootc-podman:12     demo plus podman and, in its
#                                             storage, localhost/bcvk/tiny
#   localhost/bcvk/debian-bootc-uki:12        demo with kernel + initramfs as one
#                                             UKI in /boot/EFI/Linux, no vmlinuz
#
# Pipeline (recipe in images/, see images/README.md):
#   debootstrap --variant=minbase  -> base.tar   (cached, key: recipe.conf)
#   apt-get install packages.txt   -> pkgs.tar   (cached, key: + packages.txt)
#   copy rootfs/, chroot customize.sh -> tar -> podman import --change LABEL...
#   fixtures: derived from the mounted demo image (podman image mount)
#
# Every image carries io.bcvk.recipe-hash=<sha256 of the recipe files>; an
# image is rebuilt only when it is missing or its label differs. A no-op run
# takes a few seconds.
#
# Usage: scripts/build-images.sh [--force]
# Env:   BCVK_IMAGES_WORKDIR  cache/build dir (default /var/tmp/bcvk-images)
#        BCVK_IMAGES_FORCE=1  same as --force (rebuild images; caches kept)
# Needs: root, debootstrap, podman, tar, sha256sum (scripts/host-packages.txt)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RECIPE=$REPO/images/debian-bootc
WORK=${BCVK_IMAGES_WORKDIR:-/var/tmp/bcvk-images}
FORCE=${BCVK_IMAGES_FORCE:-0}
[[ ${1:-} == --force ]] && FORCE=1

# shellcheck source-path=SCRIPTDIR/.. source=images/debian-bootc/recipe.conf
source "$RECIPE/recipe.conf"
DEMO=$IMAGE_NAME:$IMAGE_TAG
F_NOT_BOOTC=localhost/bcvk/fixture-not-bootc:latest
F_UNLABELLED=localhost/bcvk/fixture-unlabelled:latest
F_NO_KERNEL=localhost/bcvk/fixture-no-kernel:latest
F_TWO_KERNELS=localhost/bcvk/fixture-two-kernels:latest
V_ITOOLS=localhost/bcvk/debian-bootc-initramfs-tools:12
V_PODMAN=localhost/bcvk/debian-bootc-podman:12
V_UKI=localhost/bcvk/debian-bootc-uki:12

export LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive
T0=$(date +%s.%N)
log() { printf 'build-images: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1fs", b - a }'; }
# stage NAME CMD...: run CMD, then print how long it took
stage() {
    local name=$1 t
    shift
    t=$(date +%s.%N)
    log "stage $name ..."
    "$@"
    log "stage $name done in $(elapsed "$t")"
}

[[ $(id -u) == 0 ]] || die "must run as root (debootstrap, chroot, root's podman store)"
for tool in debootstrap podman tar sha256sum chroot; do
    command -v "$tool" >/dev/null || die "$tool not found (see scripts/host-packages.txt)"
done

# ---------------------------------------------------------------- hashes ----
hash_files() { # paths relative to $REPO -> one sha256 over names + contents
    (cd "$REPO" && find "$@" -type f ! -name '*.md' -print0 | LC_ALL=C sort -z |
        xargs -0 sha256sum) | sha256sum | cut -c1-64
}
BASE_KEY=$(hash_files images/debian-bootc/recipe.conf)
PKGS_KEY=$(printf '%s %s' "$BASE_KEY" "$(hash_files images/debian-bootc/packages.txt)" | sha256sum | cut -c1-64)
RECIPE_HASH=$(hash_files images scripts/build-images.sh)

label_of() { # IMAGE -> recipe-hash label ("" if image missing)
    podman image inspect --format '{{index .Labels "io.bcvk.recipe-hash"}}' "$1" 2>/dev/null || true
}
up_to_date() { [[ $FORCE != 1 && $(label_of "$1") == "$RECIPE_HASH" ]]; }

# ------------------------------------------------------------- chroot -------
mkdir -p "$WORK"
exec 9>"$WORK/.lock"
flock 9 || die "cannot lock $WORK/.lock"

TREE=$WORK/tree
DEMO_MNT=""
cleanup() {
    if [[ -n $DEMO_MNT ]]; then
        podman image unmount "$DEMO" >/dev/null 2>&1 || true
        DEMO_MNT=""
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# in_tree CMD...: run CMD chrooted into $TREE, inside a private mount
# namespace holding /proc, /sys, a minimal /dev, /run and the apt cache: the
# mounts vanish with the process, whatever happens. policy-rc.d stops
# maintainer scripts from starting daemons on the build host.
#
# /dev is a fresh tmpfs with only the character devices package scripts use,
# never the host's /dev: systemd's and udev's maintainer scripts apply
# static-nodes permissions (`z /dev/kvm 0660 - kvm -`) with the *image's*
# kvm gid, which once regrouped the host's /dev/kvm so that libvirt's QEMU
# user lost access and every domain definition re-probed QEMU (minutes).
in_tree() {
    mkdir -p "$WORK/apt-archives/partial"
    printf '#!/bin/sh\nexit 101\n' >"$TREE/usr/sbin/policy-rc.d"
    chmod 0755 "$TREE/usr/sbin/policy-rc.d"
    local rc=0
    # shellcheck disable=SC2016 # the inner script expands its own arguments
    unshare --mount --propagation private -- /bin/bash -euc '
        t=$1 apt=$2; shift 2
        mount -t proc proc "$t/proc"
        mount -t sysfs sys "$t/sys"
        mount -t tmpfs -o mode=0755,nosuid dev "$t/dev"
        for n in null zero full random urandom tty; do
            touch "$t/dev/$n"
            mount --bind "/dev/$n" "$t/dev/$n"
        done
        mkdir -p "$t/dev/pts" "$t/dev/shm"
        mount -t devpts -o newinstance,ptmxmode=0666 devpts "$t/dev/pts"
        ln -s pts/ptmx "$t/dev/ptmx"
        mount -t tmpfs -o mode=1777 shm "$t/dev/shm"
        ln -s /proc/self/fd "$t/dev/fd"
        mount -t tmpfs tmpfs "$t/run"
        mount --bind "$apt" "$t/var/cache/apt/archives"
        exec chroot "$t" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
            LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive HOME=/root "$@"
    ' in_tree "$TREE" "$WORK/apt-archives" "$@" || rc=$?
    rm -f "$TREE/usr/sbin/policy-rc.d"
    reap_tree
    return "$rc"
}
reap_tree() { # anything still running inside the tree was started by us
    local p root
    for p in /proc/[0-9]*; do
        root=$(readlink "$p/root" 2>/dev/null) || continue
        if [[ $root == "$TREE" ]]; then
            log "warning: process ${p#/proc/} ($(cat "$p/comm" 2>/dev/null)) left running in the tree; killing it"
            kill -9 "${p#/proc/}" 2>/dev/null || true
        fi
    done
}
fresh_tree() { rm -rf "$TREE"; mkdir -p "$TREE"; }
tar_tree() { # tar the tree (numeric owners, xattrs incl. file capabilities)
    tar --numeric-owner --xattrs --xattrs-include='*' -C "$TREE" -cf "$1.tmp" . && mv "$1.tmp" "$1"
}
untar_tree() { fresh_tree; tar --numeric-owner --xattrs --xattrs-include='*' -C "$TREE" -xpf "$1"; }

# ------------------------------------------------------------- stages -------
build_base() { # debootstrap -> base.tar
    fresh_tree
    mkdir -p "$WORK/debootstrap-debs"
    debootstrap --variant="$VARIANT" --cache-dir="$WORK/debootstrap-debs" \
        "$SUITE" "$TREE" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
        { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap failed (log: $WORK/debootstrap.log)"; }
    tar_tree "$WORK/base.tar"
    echo "$BASE_KEY" >"$WORK/base.key"
}

build_pkgs() { # apt-get install packages.txt -> pkgs.tar
    local pkgs
    pkgs=$(sed -e 's/#.*//' "$RECIPE/packages.txt" | xargs)
    untar_tree "$WORK/base.tar"
    cat >"$TREE/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF
    in_tree apt-get -q update >"$WORK/apt.log" 2>&1 ||
        { tail -n 30 "$WORK/apt.log" >&2; die "apt-get update failed"; }
    # busybox for the not-bootc fixture (a .deb we only unpack, never
    # install). Fetched before the install: systemd-resolved turns the tree's
    # /etc/resolv.conf into a link to a stub resolver nobody serves here.
    in_tree sh -c 'cd /root && apt-get -q download busybox-static' >>"$WORK/apt.log" 2>&1 ||
        die "apt-get download busybox-static failed"
    mv "$TREE"/root/busybox-static_*.deb "$WORK/busybox-static.deb"
    # INITRD=No: skip the Debian kernel hook's dracut run; customize.sh makes ours
    # shellcheck disable=SC2086
    in_tree env INITRD=No apt-get -q -y --no-install-recommends install $pkgs >>"$WORK/apt.log" 2>&1 ||
        { tail -n 30 "$WORK/apt.log" >&2; die "apt-get install failed (log: $WORK/apt.log)"; }
    tar_tree "$WORK/pkgs.tar"
    echo "$PKGS_KEY" >"$WORK/pkgs.key"
}

# build_image NAME DESCRIPTION INITRAMFS [PACKAGE...]: the package tree, plus
# PACKAGEs, customised (initramfs by INITRAMFS: dracut or initramfs-tools)
# -> podman import NAME
build_image() {
    local name=$1 description=$2 generator=$3 version size log
    shift 3
    log=$WORK/customize-${name##*/}.log
    log=${log/:/-}
    untar_tree "$WORK/pkgs.tar"
    if [[ $# -gt 0 ]]; then
        # A resolver for apt (customize.sh links resolved's stub back in).
        rm -f "$TREE/etc/resolv.conf"
        cp /etc/resolv.conf "$TREE/etc/resolv.conf"
        # initramfs-tools replaces dracut (they conflict); INITRD=No: customize.sh makes it
        in_tree env INITRD=No apt-get -q -y --no-install-recommends install "$@" >"$log" 2>&1 ||
            { tail -n 30 "$log" >&2; die "apt-get install $* failed (log: $log)"; }
    fi
    cp -rT --preserve=mode "$RECIPE/rootfs" "$TREE"
    chown -R 0:0 "$TREE/etc" # files from the checkout may belong to anyone
    install -m 0755 "$RECIPE/customize.sh" "$TREE/customize.sh"
    in_tree env BCVK_INITRAMFS="$generator" /customize.sh >>"$log" 2>&1 ||
        { tail -n 30 "$log" >&2; die "customize.sh failed (log: $log)"; }
    rm -f "$TREE/customize.sh"
    find "$TREE/var/cache/apt/archives" -name '*.deb' -delete # left by debootstrap
    if [[ -n ${WITH_TINY_IMAGE:-} ]]; then
        add_tiny_image "$TREE/var/lib/containers/storage"
    fi
    version=$(cat "$TREE/etc/debian_version")
    size=$(du -sh --apparent-size "$TREE" | cut -f1)
    log "rootfs: $size, Debian $version, kernel $(ls "$TREE/usr/lib/modules")"
    tar --numeric-owner --xattrs --xattrs-include='*' -C "$TREE" -cf - . |
        podman import -q \
            --change 'CMD ["/sbin/init"]' \
            --change 'LABEL containers.bootc=1' \
            --change "LABEL org.opencontainers.image.title=${name##*/}" \
            --change "LABEL org.opencontainers.image.version=$version" \
            --change "LABEL org.opencontainers.image.description=\"$description\"" \
            --change "LABEL io.bcvk.recipe-hash=$RECIPE_HASH" \
            --message "bcvk build-images.sh" - "$name" >/dev/null
    rm -rf "$TREE"
}

build_demo() {
    build_image "$DEMO" "Debian 12 bootable container image built by bcvk scripts/build-images.sh (systemd, sshd, dracut initramfs)" dracut
}

build_itools() {
    build_image "$V_ITOOLS" "bcvk test image: the demo image with an initramfs-tools initramfs (no systemd in it)" \
        initramfs-tools initramfs-tools busybox
}

build_podman() {
    WITH_TINY_IMAGE=1 build_image "$V_PODMAN" "bcvk test image: the demo image with podman and localhost/bcvk/tiny in its storage" \
        dracut podman crun
}

# add_tiny_image STORAGE: localhost/bcvk/tiny (busybox) into the podman
# storage at STORAGE, with the overlay driver the guest's podman uses
add_tiny_image() {
    local storage=$1 t=$WORK/tiny
    rm -rf "$t"
    busybox_tree "$t/root"
    mkdir -p "$storage" "$t/runroot"
    tar --numeric-owner --owner=0 --group=0 -C "$t/root" -cf - . |
        podman --root "$storage" --runroot "$t/runroot" --storage-driver overlay \
            import -q --change 'CMD ["/bin/sh"]' - localhost/bcvk/tiny:latest >/dev/null
    # libpod's database names this build's paths; the guest's podman makes its own
    rm -rf "$storage/libpod"
    rm -rf "$t"
}

import_from_demo() { # NAME LABELS-ARGS... -- TAR-ARGS... : tar of the demo rootfs -> import
    local name=$1 changes=() extra=()
    shift
    while [[ $1 != -- ]]; do changes+=(--change "$1"); shift; done
    shift
    extra=("$@")
    tar --numeric-owner --xattrs --xattrs-include='*' -C "$DEMO_MNT" -cf - "${extra[@]}" |
        podman import -q "${changes[@]}" --change "LABEL io.bcvk.recipe-hash=$RECIPE_HASH" \
            --message "bcvk build-images.sh fixture" - "$name" >/dev/null
}

common_labels=('CMD ["/sbin/init"]' 'LABEL org.opencontainers.image.version=12')

build_unlabelled() {
    import_from_demo "$F_UNLABELLED" "${common_labels[@]}" \
        'LABEL org.opencontainers.image.title=fixture-unlabelled' \
        'LABEL org.opencontainers.image.description="bcvk fixture: demo content without the containers.bootc label"' \
        -- .
}

build_no_kernel() {
    import_from_demo "$F_NO_KERNEL" "${common_labels[@]}" 'LABEL containers.bootc=1' \
        'LABEL org.opencontainers.image.title=fixture-no-kernel' \
        'LABEL org.opencontainers.image.description="bcvk fixture: bootc label but no kernel under /usr/lib/modules"' \
        -- --exclude='./usr/lib/modules/*' --exclude='./boot/vmlinuz*' --exclude='./boot/initrd*' .
}

build_two_kernels() {
    local kver second=$WORK/second
    kver=$(ls "$DEMO_MNT/usr/lib/modules")
    rm -rf "$second"
    mkdir -p "$second/usr/lib/modules/$kver-second"
    cp "$DEMO_MNT/usr/lib/modules/$kver/vmlinuz" "$DEMO_MNT/usr/lib/modules/$kver/initramfs.img" \
        "$second/usr/lib/modules/$kver-second/"
    import_from_demo "$F_TWO_KERNELS" "${common_labels[@]}" 'LABEL containers.bootc=1' \
        'LABEL org.opencontainers.image.title=fixture-two-kernels' \
        'LABEL org.opencontainers.image.description="bcvk fixture: two kernels under /usr/lib/modules"' \
        -- . -C "$second" "./usr/lib/modules/$kver-second"
    rm -rf "$second"
}

build_uki() { # the demo's kernel and initramfs as one UKI (objcopy onto systemd's stub)
    local kver t=$WORK/uki mods
    kver=$(ls "$DEMO_MNT/usr/lib/modules")
    mods=$DEMO_MNT/usr/lib/modules/$kver
    rm -rf "$t"
    mkdir -p "$t/boot/EFI/Linux"
    printf 'console=ttyS0' >"$t/cmdline"
    objcopy \
        --add-section .osrel="$DEMO_MNT/usr/lib/os-release" --change-section-vma .osrel=0x20000 \
        --add-section .cmdline="$t/cmdline" --change-section-vma .cmdline=0x30000 \
        --add-section .linux="$mods/vmlinuz" --change-section-vma .linux=0x2000000 \
        --add-section .initrd="$mods/initramfs.img" --change-section-vma .initrd=0x3000000 \
        "$DEMO_MNT/usr/lib/systemd/boot/efi/linuxx64.efi.stub" "$t/boot/EFI/Linux/$kver.efi"
    import_from_demo "$V_UKI" "${common_labels[@]}" 'LABEL containers.bootc=1' \
        'LABEL org.opencontainers.image.title=debian-bootc-uki' \
        'LABEL org.opencontainers.image.description="bcvk test image: the demo image booting from a UKI only"' \
        -- --exclude="./usr/lib/modules/$kver/vmlinuz" --exclude="./usr/lib/modules/$kver/initramfs.img" \
        . -C "$t" "./boot/EFI/Linux/$kver.efi"
    rm -rf "$t"
}

busybox_tree() { # DIR: a tiny root with busybox-static and its applets
    local t=$1 applet deb=$WORK/busybox-deb
    rm -rf "$deb"
    mkdir -p "$deb" "$t"/{bin,etc,tmp,root}
    dpkg-deb -x "$WORK/busybox-static.deb" "$deb"
    install -m 0755 "$deb/bin/busybox" "$t/bin/busybox"
    for applet in $("$t/bin/busybox" --list); do
        [[ $applet == busybox ]] || ln -s busybox "$t/bin/$applet"
    done
    ln -s bin "$t/sbin"
    chmod 1777 "$t/tmp"
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$t/etc/passwd"
    printf 'root:x:0:\n' >"$t/etc/group"
    rm -rf "$deb"
}

build_not_bootc() { # tiny busybox tree, no systemd, no kernel, no label
    local t=$WORK/busybox-tree
    rm -rf "$t"
    busybox_tree "$t/root"
    tar --numeric-owner --owner=0 --group=0 -C "$t/root" -cf - . |
        podman import -q --change 'CMD ["/bin/sh"]' \
            --change 'LABEL org.opencontainers.image.title=fixture-not-bootc' \
            --change 'LABEL org.opencontainers.image.version=1' \
            --change 'LABEL org.opencontainers.image.description="bcvk fixture: application container (busybox), not bootable"' \
            --change "LABEL io.bcvk.recipe-hash=$RECIPE_HASH" \
            --message "bcvk build-images.sh fixture" - "$F_NOT_BOOTC" >/dev/null
    rm -rf "$t"
}

# --------------------------------------------------------------- main -------
log "recipe hash $RECIPE_HASH, workdir $WORK"
if up_to_date "$DEMO"; then
    log "$DEMO is up to date"
else
    if [[ $(cat "$WORK/base.key" 2>/dev/null) != "$BASE_KEY" || ! -f $WORK/base.tar ]]; then
        stage "debootstrap ($SUITE, $VARIANT)" build_base
    else
        log "debootstrap tree cached ($WORK/base.tar)"
    fi
    if [[ $(cat "$WORK/pkgs.key" 2>/dev/null) != "$PKGS_KEY" || ! -f $WORK/pkgs.tar || ! -f $WORK/busybox-static.deb ]]; then
        stage "packages" build_pkgs
    else
        log "package tree cached ($WORK/pkgs.tar)"
    fi
    stage "customise + import $DEMO" build_demo
fi

# Variants built from the package tree (which a cached demo may not need).
for pair in "$V_ITOOLS:build_itools" "$V_PODMAN:build_podman"; do
    img=${pair%:*} fn=${pair##*:}
    if up_to_date "$img"; then
        log "$img is up to date"
        continue
    fi
    if [[ $(cat "$WORK/pkgs.key" 2>/dev/null) != "$PKGS_KEY" || ! -f $WORK/pkgs.tar || ! -f $WORK/busybox-static.deb ]]; then
        stage "packages" build_pkgs
    fi
    stage "customise + import $img" "$fn"
done

for pair in "$F_UNLABELLED:build_unlabelled" "$F_NO_KERNEL:build_no_kernel" \
    "$F_TWO_KERNELS:build_two_kernels" "$F_NOT_BOOTC:build_not_bootc" "$V_UKI:build_uki"; do
    img=${pair%:*} fn=${pair##*:}
    if up_to_date "$img"; then
        log "$img is up to date"
        continue
    fi
    if [[ $fn == build_not_bootc ]]; then
        if [[ ! -f $WORK/busybox-static.deb ]]; then
            stage "packages (for busybox-static.deb)" build_pkgs
        fi
    elif [[ -z $DEMO_MNT ]]; then
        DEMO_MNT=$(podman image mount "$DEMO")
    fi
    stage "import $img" "$fn"
done
cleanup

# Old builds leave dangling (untagged) images behind: remove ours, except
# those someone still has mounted (e.g. a running VM's virtiofs root).
mounted=$(podman image mount --format json 2>/dev/null || true)
for id in $(podman images --no-trunc --filter dangling=true --filter label=io.bcvk.recipe-hash --format '{{.ID}}'); do
    id=${id#sha256:}
    if grep -q "$id" <<<"$mounted"; then
        log "keeping old image ${id:0:12}: still mounted"
        continue
    fi
    podman rmi "$id" >/dev/null 2>&1 || true
done

log "$DEMO size $(podman image inspect --format '{{.Size}}' "$DEMO") bytes"
log "all images ready in $(elapsed "$T0")"
