set -euo pipefail
export STORAGE_OPTS=additionalimagestore=/run/virtiofs-mnt-hoststorage
export RUST_LOG=bootc_lib=debug,info
printf '%s' 'ssh-ed25519 AAAA it'"'"'s me
' > /run/bcvk-authorized-keys
exec bootc install to-disk --generic-image --skip-fetch-check --source-imgref containers-storage:localhost/bcvk/debian-bootc:12 --filesystem xfs --root-size 10240M --karg=console=ttyS0 '--karg=a b' --target-transport containers-storage --composefs-backend --bootloader systemd --allow-missing-fsverity --root-ssh-authorized-keys /run/bcvk-authorized-keys /dev/disk/by-id/virtio-output
