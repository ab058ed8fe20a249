#!/bin/sh
# Runs INSIDE the image tree (chroot), as root, after the packages from
# packages.txt are installed and rootfs/ has been copied over the tree.
# It turns a plain Debian tree into a bootc-style image:
#   kernel + generic initramfs under /usr/lib/modules/<kver>/,
#   services enabled, no per-machine state, no caches/docs.
set -eu

log() { echo "customize: $*" >&2; }

# --- kernel: exactly one, moved to where bootc tooling looks for it --------
set -- /usr/lib/modules/*/
[ $# -eq 1 ] || { log "expected exactly one kernel, found: $*"; exit 1; }
kver=$(basename "$1")
moddir=/usr/lib/modules/$kver
log "kernel $kver"

mv "/boot/vmlinuz-$kver" "$moddir/vmlinuz"
[ -f "/boot/config-$kver" ] && mv "/boot/config-$kver" "$moddir/config"
[ -f "/boot/System.map-$kver" ] && mv "/boot/System.map-$kver" "$moddir/System.map"
rm -f /boot/initrd.img-* /vmlinuz /vmlinuz.old /initrd.img /initrd.img.old
# no firmware blobs are needed by a virtual machine
rm -rf /usr/lib/firmware/*

# Drop module trees no VM needs (sound, GPUs, wireless, cameras, ...).
# Storage, filesystems, virtio, netfilter, usb-hid etc. stay.
for d in \
    sound \
    drivers/gpu drivers/media drivers/staging drivers/infiniband \
    drivers/net/wireless drivers/net/can drivers/net/wwan drivers/net/usb \
    drivers/bluetooth drivers/isdn drivers/iio drivers/nfc drivers/mmc \
    drivers/thunderbolt drivers/w1 drivers/pcmcia \
    drivers/atm drivers/firewire drivers/fpga drivers/misc/mei \
    drivers/scsi/lpfc drivers/scsi/qla2xxx drivers/scsi/qla4xxx \
    drivers/scsi/mpt3sas drivers/scsi/megaraid drivers/scsi/bfa \
    drivers/scsi/be2iscsi drivers/scsi/bnx2fc drivers/scsi/csiostor \
    net/bluetooth net/wireless net/mac80211 net/nfc net/can
do
    rm -rf "${moddir:?}/kernel/$d"
done
# physical NICs: keep the ones hypervisors emulate (e1000/e1000e/igb:
# intel, rtl8139/8169: realtek, ENA: amazon, gVNIC: google)
for d in "$moddir"/kernel/drivers/net/ethernet/*/; do
    case $(basename "$d") in intel | realtek | amazon | google) ;; *) rm -rf "$d" ;; esac
done
depmod -a "$kver"

# --- generic initramfs ------------------------------------------------------
# dracut (config: /etc/dracut.conf.d/10-bcvk.conf) for the demo image; the
# initramfs-tools variant (BCVK_INITRAMFS=initramfs-tools) has no systemd in
# its initramfs, as Debian's and Ubuntu's default images.
case ${BCVK_INITRAMFS:-dracut} in
dracut) dracut --force --no-hostonly --kver "$kver" "$moddir/initramfs.img" ;;
initramfs-tools)
    # mkinitramfs reads the kernel's config from /boot (moved away above)
    ln -s "$moddir/config" "/boot/config-$kver"
    mkinitramfs -o "$moddir/initramfs.img" "$kver"
    rm -f "/boot/config-$kver"
    ;;
*) log "unknown BCVK_INITRAMFS=$BCVK_INITRAMFS"; exit 1 ;;
esac
rm -f /boot/initrd.img-*
chmod 0644 "$moddir/initramfs.img"

# --- services ---------------------------------------------------------------
systemctl enable systemd-networkd.service systemd-resolved.service ssh.service
# networkd's wait-online would delay multi-user.target for every NIC that
# never gets a lease; ssh readiness is probed from outside anyway.
systemctl disable systemd-networkd-wait-online.service || true
ln -sf ../run/systemd/resolve/stub-resolv.conf /etc/resolv.conf
systemctl set-default multi-user.target
# no background package downloads from short-lived VMs
systemctl disable apt-daily.timer apt-daily-upgrade.timer

# --- no per-machine state ---------------------------------------------------
rm -f /etc/ssh/ssh_host_*
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id
rm -f /var/lib/systemd/random-seed /var/lib/systemd/credential.secret
# root: no password (locked), login by SSH key only
usermod -p '*' root

# --- size -------------------------------------------------------------------
# (no apt-get clean: the build bind-mounts its package cache on
# /var/cache/apt/archives; the tree itself holds no .debs)
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old \
       /var/log/*.log /var/log/apt/* /tmp/* /var/tmp/*
find /usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete
find /usr/share/doc -mindepth 1 -type d -empty -delete
rm -rf /usr/share/man/* /usr/share/info/* /usr/share/lintian /usr/share/linda
find /usr/share/locale -mindepth 1 -maxdepth 1 -not -name locale.alias \
    -exec rm -rf {} +
log "done"
