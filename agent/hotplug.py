"""The QEMU side of a disk: blockdev-add + device_add, and their undoing.

Slots are found by asking QEMU (``query-pci``), never guessed:

* ``virtio-blk-pci`` goes on a free ``pcie-root-port`` (q35) or, on a
  machine with a conventional PCI root bus (i440fx), on ``pci.0`` while it
  has a free slot;
* ``scsi-hd`` goes on the first ``virtio-scsi-pci`` controller with an id.

Slot choice and ``device_add`` run under one lock so that concurrent adds
never pick the same root port.  Every step that fails undoes the steps
before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog
import trio

from agent.errors import NoFreeSlot, QmpError

log = structlog.get_logger()

REDHAT_VENDOR = 0x1B36
PCIE_ROOT_PORT = 0x000C
VIRTIO_VENDOR = 0x1AF4
VIRTIO_SCSI_IDS = (0x1004, 0x1048)
I440FX_HOST = (0x8086, 0x1237)
PCI_SLOTS = 32


class Qmp(Protocol):
    """What this module needs of a QMP connection (``agent.qmp.QmpConnection``)."""

    async def execute(self, cmd: str, args: dict[str, Any] | None = None, *,
                      timeout: float | None = None) -> Any: ...


def node_name(disk: str) -> str:
    return f"nbdhp-{disk}"


def device_id(disk: str) -> str:
    return f"nbdhp-dev-{disk}"


@dataclass(frozen=True)
class Attachment:
    node: str
    device: str
    bus: str


def _walk(buses: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All PCI devices, depth first, with ``_bus`` set to their bus number."""
    out: list[dict[str, Any]] = []

    def visit(bus_no: int, devices: list[dict[str, Any]]) -> None:
        for dev in devices:
            out.append({**dev, "_bus": bus_no})
            bridge = dev.get("pci_bridge")
            if bridge:
                visit(bridge["bus"]["secondary"], bridge.get("devices", []))

    for bus in buses:
        visit(bus["bus"], bus["devices"])
    return out


def pick_bus(pci: list[dict[str, Any]], driver: str, taken: set[str]) -> str:
    """Choose the bus for a new device from a ``query-pci`` answer.

    Raises NoFreeSlot.
    """
    devices = _walk(pci)
    if driver == "scsi-hd":
        for dev in devices:
            ident = dev["id"]
            if (ident["vendor"] == VIRTIO_VENDOR and ident["device"] in VIRTIO_SCSI_IDS
                    and dev.get("qdev_id")):
                return f"{dev['qdev_id']}.0"
        raise NoFreeSlot("no virtio-scsi-pci controller with an id "
                         "(start QEMU with -device virtio-scsi-pci,id=scsi0)")
    for dev in devices:
        ident = dev["id"]
        bridge = dev.get("pci_bridge")
        if (ident["vendor"] == REDHAT_VENDOR and ident["device"] == PCIE_ROOT_PORT
                and bridge is not None and not bridge.get("devices")
                and dev.get("qdev_id") and dev["qdev_id"] not in taken):
            return str(dev["qdev_id"])
    root = [d for d in devices if d["_bus"] == 0]
    is_i440fx = any((d["id"]["vendor"], d["id"]["device"]) == I440FX_HOST for d in root)
    if is_i440fx and len({d["slot"] for d in root}) + len(taken) < PCI_SLOTS:
        return "pci.0"
    raise NoFreeSlot("no free hot-pluggable PCI slot: add a free pcie-root-port "
                     "(-device pcie-root-port,id=rpN,chassis=N) on q35")


class Hotplug:
    """Adds and removes the QEMU node and device of a disk."""

    def __init__(self, qmp: Qmp) -> None:
        self.qmp = qmp
        self._slot_lock = trio.Lock()

    async def attach(self, *, disk: str, socket: Path, readonly: bool, driver: str,
                     reconnect_delay: int, werror: str | None,
                     rerror: str | None) -> Attachment:
        """blockdev-add then device_add.  On failure, undoes what it did.

        Raises QmpError (and subclasses), NoFreeSlot.  Cancellation undoes
        too (shielded).
        """
        node, dev = node_name(disk), device_id(disk)
        await self.qmp.execute("blockdev-add", {
            "driver": "nbd",
            "node-name": node,
            "server": {"type": "unix", "path": str(socket)},
            "reconnect-delay": reconnect_delay,
            "read-only": readonly,
        })
        try:
            async with self._slot_lock:
                bus = pick_bus(await self.qmp.execute("query-pci"), driver, set())
                args: dict[str, Any] = {"driver": driver, "id": dev, "drive": node, "bus": bus}
                if werror:
                    args["werror"] = werror
                if rerror:
                    args["rerror"] = rerror
                await self.qmp.execute("device_add", args)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.delete_node(node)
            raise
        return Attachment(node, dev, bus)

    async def request_unplug(self, device: str) -> bool:
        """device_del; returns False if QEMU no longer has the device.

        A repeated request while the guest has not yet released the device
        is not an error.  Raises QmpError otherwise.
        """
        try:
            await self.qmp.execute("device_del", {"id": device})
        except QmpError as err:
            if err.context.get("qmp_class") == "DeviceNotFound":
                return False
            if "already in the process of unplug" in err.message:
                return True
            raise
        return True

    async def delete_node(self, node: str) -> None:
        """blockdev-del, tolerating a node that is already gone.  Raises QmpError."""
        try:
            await self.qmp.execute("blockdev-del", {"node-name": node})
        except QmpError as err:
            named = await self.qmp.execute("query-named-block-nodes", {"flat": True})
            if any(n.get("node-name") == node for n in named):
                raise
            log.debug("blockdev-del-gone", node=node, error=err.message)
