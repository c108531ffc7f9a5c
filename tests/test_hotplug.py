"""Unit tests of slot choice (QOM device lists are made up here)."""

from __future__ import annotations

import pytest

from agent.errors import NoFreeSlot
from agent.hotplug import Device, pick_bus

Q35 = "pc-q35-7.2-machine"


def _q35(*extra: Device) -> list[Device]:
    return [
        Device("rp1", "pcie-root-port", "/machine/q35/pcie.0"),
        Device("rp2", "pcie-root-port", "/machine/q35/pcie.0"),
        Device(None, "pcie-root-port", "/machine/q35/pcie.0"),
        Device("scsi0", "virtio-scsi-pci", "/machine/q35/pcie.0"),
        *extra,
    ]


def test_first_free_root_port() -> None:
    assert pick_bus(_q35(), "virtio-blk-pci", Q35, 0) == "rp1"
    used = Device("d", "virtio-blk-pci", "/machine/peripheral/rp1/rp1")
    assert pick_bus(_q35(used), "virtio-blk-pci", Q35, 0) == "rp2"


def test_no_free_root_port() -> None:
    devs = _q35(Device("a", "virtio-blk-pci", "/machine/peripheral/rp1/rp1"),
                Device(None, "virtio-net-pci", "/machine/peripheral/rp2/rp2"))
    with pytest.raises(NoFreeSlot):
        pick_bus(devs, "virtio-blk-pci", Q35, 0)


def test_scsi_bus_needs_a_named_controller() -> None:
    assert pick_bus(_q35(), "scsi-hd", Q35, 0) == "scsi0.0"
    with pytest.raises(NoFreeSlot):
        pick_bus([Device(None, "virtio-scsi-pci", "/machine/q35/pcie.0")], "scsi-hd", Q35, 0)


def test_i440fx_root_bus() -> None:
    machine = "pc-i440fx-7.2-machine"
    assert pick_bus([], "virtio-blk-pci", machine, 5) == "pci.0"
    with pytest.raises(NoFreeSlot):
        pick_bus([], "virtio-blk-pci", machine, 32)
