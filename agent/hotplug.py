"""The QEMU side of a disk: blockdev-add + device_add, and their undoing.

Slots are found by asking QEMU (QOM: each device's type and parent bus),
never guessed:

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


@dataclass(frozen=True)
class Device:
    """One user-created device, as QOM shows it."""

    id: str | None  # None for devices created without an id
    type: str
    parent_bus: str  # QOM path of the bus it sits on


def pick_bus(devices: list[Device], driver: str, machine: str, root_slots_used: int) -> str:
    """Choose the bus for a new ``driver`` device.  Raises NoFreeSlot.

    A root port counts as free when no device sits on its bus (whose QOM
    path ends in the port's id).  QOM, not ``query-pci``, is the source:
    ``query-pci`` only shows bridges that firmware has numbered, so it
    misses every root port of a VM that has not booted yet.
    """
    if driver == "scsi-hd":
        for dev in devices:
            if dev.type == "virtio-scsi-pci" and dev.id:
                return f"{dev.id}.0"
        raise NoFreeSlot("no virtio-scsi-pci controller with an id "
                         "(start QEMU with -device virtio-scsi-pci,id=scsi0)")
    occupied = {d.parent_bus.rsplit("/", 1)[-1] for d in devices}
    for dev in devices:
        if dev.type == "pcie-root-port" and dev.id and dev.id not in occupied:
            return dev.id
    if "i440fx" in machine and root_slots_used < PCI_SLOTS:
        return "pci.0"
    raise NoFreeSlot("no free hot-pluggable PCI slot: add a free pcie-root-port "
                     "(-device pcie-root-port,id=rpN,chassis=N) on q35")


async def list_devices(qmp: Qmp) -> list[Device]:
    """Every device under /machine/peripheral{,-anon}, with its bus."""
    out: list[Device] = []
    for base, named in (("/machine/peripheral", True), ("/machine/peripheral-anon", False)):
        for item in await qmp.execute("qom-list", {"path": base}):
            kind = item["type"]
            if not kind.startswith("child<"):
                continue
            path = f"{base}/{item['name']}"
            bus = await qmp.execute("qom-get", {"path": path, "property": "parent_bus"})
            out.append(Device(item["name"] if named else None, kind[6:-1], str(bus)))
    return out


async def find_bus(qmp: Qmp, driver: str) -> str:
    """Ask QEMU for a free place for a ``driver`` device.  Raises NoFreeSlot."""
    devices = await list_devices(qmp)
    machine = str(await qmp.execute("qom-get", {"path": "/machine", "property": "type"}))
    used = 0
    if "i440fx" in machine:
        pci = await qmp.execute("query-pci")
        used = len({d["slot"] for d in pci[0]["devices"]})
    return pick_bus(devices, driver, machine, used)


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
                bus = await find_bus(self.qmp, driver)
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
