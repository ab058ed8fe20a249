set -eu
[ -e /dev/virtio-ports/org.bcvk.control ] || { echo "no /dev/virtio-ports/org.bcvk.control in the guest" >&2; exit 1; }
mkdir -p -m 0700 /run/bcvk
cat > /run/bcvk/control.sh <<'BCVK_AGENT'
<AGENT>
BCVK_AGENT
chmod 0700 /run/bcvk/control.sh
systemd-run --quiet --collect --unit=bcvk-control /bin/sh /run/bcvk/control.sh
i=0
until systemctl is-active --quiet bcvk-control; do
  i=$((i + 1))
  [ "$i" -lt 100 ] || { echo "bcvk-control did not start" >&2; exit 1; }
  sleep 0.1
done
keys=/root/.ssh/authorized_keys
grep -vxF -e 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTestsOnly0123456789abcdef bcvk-vm1' "$keys" > "$keys.bcvk" || :
cat "$keys.bcvk" > "$keys"
rm -f "$keys.bcvk"
if grep -qxF -e 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTestsOnly0123456789abcdef bcvk-vm1' "$keys"; then echo "the key is still in $keys" >&2; exit 1; fi
