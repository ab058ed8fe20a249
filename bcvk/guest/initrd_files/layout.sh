# bcvk's guest layout: `sh /bcvk/layout.sh ROOT`, run in the initramfs once
# the image's root is mounted read-only at ROOT (bcvk-layout.service under a
# systemd initrd, init-bottom under initramfs-tools).  It gives the booted
# system bootc's filesystem model without writing to the image:
#   /            the image, read-only
#   /etc         an overlay: the image's /etc below, a tmpfs above
#   /var         a tmpfs holding a copy of the image's /var: a real filesystem,
#                so overlayfs can be mounted on it (podman in the guest)
#   /root /home  an overlay each, only where the image keeps them on / (bootc
#                images link them into /var)
#   /tmp         a tmpfs, where the image has a plain directory
# Upper layers live in /run/bcvk, which the initramfs moves into the booted
# system with the rest of /run.  What went wrong is kept in
# /run/bcvk/problems for the boot report (status.sh) to pass to the host.
# On a disk bcvk built (the archive carries /bcvk/disk) the root is the VM's
# own and writable: only the services below are installed.
root=${1:?usage: layout.sh ROOT}
state=/run/bcvk
mkdir -p "$state" || exit 1

problem() {
    echo "$*" >>"$state/problems"
    echo "bcvk: $*" >/dev/kmsg 2>/dev/null || echo "bcvk: $*" >&2
}

overlay() { # DIR: ROOT/DIR becomes an overlay whose upper layer is in $state
    mkdir -p "$state/$1/upper" "$state/$1/work" &&
        mount -t overlay -o "lowerdir=$root/$1,upperdir=$state/$1/upper,workdir=$state/$1/work" \
            "bcvk-$1" "$root/$1" ||
        problem "/$1 is read-only: its overlay could not be mounted"
}

layout() {
    # initramfs-tools leaves overlayfs out; bcvk then brings the image's module
    if ! modprobe overlay 2>/dev/null; then
        for module in /bcvk/modules/overlay.ko*; do
            [ -e "$module" ] && insmod "$module"
        done
    fi
    overlay etc
    for dir in root home; do
        if [ -d "$root/$dir" ] && [ ! -L "$root/$dir" ]; then
            overlay "$dir"
        fi
    done
    if [ -d "$root/tmp" ] && [ ! -L "$root/tmp" ]; then
        mount -t tmpfs -o mode=1777,nosuid,nodev bcvk-tmp "$root/tmp" || problem "/tmp is read-only"
    fi

    mkdir -p "$state/var"
    if mount -t tmpfs -o mode=0755 bcvk-var "$state/var"; then
        if command -v cp >/dev/null 2>&1; then
            cp -a "$root/var/." "$state/var/" || problem "copying the image's /var failed"
        else
            problem "the initramfs has no cp: /var starts empty"
        fi
        mount -o bind "$state/var" "$root/var" || problem "/var is read-only: its bind mount failed"
    else
        problem "/var is read-only: no tmpfs for it"
    fi
}

[ -e /bcvk/disk ] || layout

# Units, udev rules and scripts for the booted system: its systemd and udev
# read /run/systemd/system and /run/udev/rules.d, so the image is untouched.
mkdir -p /run/systemd/system /run/udev/rules.d "$state/libexec"
for file in /bcvk/system/*; do
    cat "$file" >"/run/systemd/system/${file##*/}"
done
for file in /bcvk/libexec/*; do
    cat "$file" >"$state/libexec/${file##*/}"
done
cat /bcvk/70-bcvk.rules >/run/udev/rules.d/70-bcvk.rules
# --systemd-units: the user's units, in an archive of their own after this one
if [ -d /bcvk/units ]; then
    cp -a /bcvk/units/. /run/systemd/system/ || problem "copying the --systemd-units failed"
fi
