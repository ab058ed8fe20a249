# bcvk's boot report, written to the host over the virtio-serial port
# org.bcvk.status by bcvk-status.service once the SSH server's start job has
# finished: how each SSH unit ended, whether the key arrived, whether an
# --execute command was handed in, and what layout.sh could not do.  The host
# reads it to say why SSH does not answer instead of waiting out its timeout.
for unit in ssh.service sshd.service ssh.socket sshd.socket; do
    printf 'unit %s ' "$unit"
    systemctl show --property=LoadState,ActiveState,SubState,Result "$unit" | tr '\n' ' '
    echo
done
if [ -s /root/.ssh/authorized_keys ]; then echo "key present"; else echo "key missing"; fi
if [ -e /run/credentials/@system/bcvk.execute ]; then echo "execute present"; fi
if [ -f /run/bcvk/problems ]; then sed 's/^/problem /' /run/bcvk/problems; fi
echo done
