"""bcvk doctor's pure checks."""

from __future__ import annotations

import pytest

from bcvk import doctor


@pytest.mark.parametrize(
    ("text", "user"),
    [
        (None, "libvirt-qemu"),
        ('#user = "root"\nuser = "qemu"\n', "qemu"),
        ('user = "+64055"\n', "64055"),
    ],
)
def test_libvirt_qemu_user_from_qemu_conf(text: str | None, user: str) -> None:
    assert doctor.libvirt_qemu_user(text) == user


@pytest.mark.parametrize(
    ("mode", "owner", "group", "uid", "gids", "ok"),
    [
        (0o660, 0, 103, 64055, {108, 64055}, False),  # this host's /dev/kvm before the fix
        (0o660, 0, 108, 64055, {108, 64055}, True),  # group kvm, user in kvm
        (0o666, 0, 103, 64055, {64055}, True),
        (0o600, 64055, 0, 64055, set(), True),
        (0o660, 0, 103, 0, set(), True),
    ],
)
def test_device_access_for_another_user(
    mode: int, owner: int, group: int, uid: int, gids: set[int], ok: bool
) -> None:
    assert doctor.can_read_write(mode, owner, group, uid, gids) is ok
