set -e
mkdir -p /var/src
grep -qxF 'bcvk-bind-0 /var/src virtiofs rw,nofail 0 0' /etc/fstab || echo 'bcvk-bind-0 /var/src virtiofs rw,nofail 0 0' >> /etc/fstab
mountpoint -q /var/src || mount -t virtiofs -o rw bcvk-bind-0 /var/src
mkdir -p /mnt/data
grep -qxF 'bcvk-bind-ro-0 /mnt/data virtiofs ro,nofail 0 0' /etc/fstab || echo 'bcvk-bind-ro-0 /mnt/data virtiofs ro,nofail 0 0' >> /etc/fstab
mountpoint -q /mnt/data || mount -t virtiofs -o ro bcvk-bind-ro-0 /mnt/data
