# After the --execute commands (ExecStopPost of bcvk-execute.service): their
# result to the host, then power off, which ends the VM.
echo "result=$SERVICE_RESULT code=$EXIT_CODE status=$EXIT_STATUS" \
    >/dev/virtio-ports/org.bcvk.execute.status
systemctl --no-block poweroff
