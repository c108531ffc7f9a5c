"""End to end with a real guest: hot-plugged nbdkit disks as a Linux guest sees them.

Each test boots the tiny busybox guest of :mod:`contrib.guest` under QEMU
(about 4 s under TCG) and starts a real agent on its QMP socket, then checks
from three sides: the guest (block devices, O_DIRECT I/O, sha256 sums,
``dmesg``), the host (the backing images, /proc, the runtime dir) and QEMU
(a second QMP monitor of the test's own).  A test runs several checks in
sequence on one VM to keep boots few: pytest-trio fixtures are
function-scoped, so a VM cannot be shared across tests.

Waits poll real conditions under a deadline (a guest command, an agent
event, a QMP query); every test has an absolute timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from agent.client import ControlClient, open_control
from contrib.guest.build import ensure_guest
from contrib.guest.qmp import QMPClient, open_qmp
from contrib.guest.vm import GuestCommandTimeout, GuestVM, open_guest_vm
from contrib.guestio import (
    GuestLoop,
    block_bytes,
    block_devices,
    chunk_sha256,
    guest_now_ns,
    io_error_lines,
    pci_slot_of,
    wait_gone,
    wait_new_block_device,
    write_read_verify,
)
from contrib.lab import EventLog
from tests.conftest import Agent, make_image, node_names, ok, peripherals, start_agent

pytestmark = pytest.mark.e2e

MiB = 1 << 20
#: Seconds the guest may take to show a hot-plugged disk (measured: ~0.1 s).
SHOW_TIMEOUT = 15

#: The kill tests kill nbdkit as soon as the guest saw the last recovery,
#: which is much faster than the default restart policy allows (an exit
#: less than min_uptime = 1 s after ready counts as a failure and backs off,
#: 5 failures make the disk "failed").  So this agent runs with min_uptime 0:
#: every kill is a one-off crash, restarted at once.
AGENT_CONFIG = "[restart]\nmin_uptime = 0.0\n"


@dataclass
class Lab:
    """One booted guest, its agent, a subscribed control connection, a QMP monitor."""

    vm: GuestVM
    agent: Agent
    ctl: ControlClient
    events: EventLog
    monitor: QMPClient
    tmp: Path

    async def wait_event(self, name: str, timeout: float = 20, **match: Any) -> dict[str, Any]:
        return await self.events.wait(name, timeout, **match)

    def count(self, name: str, **match: Any) -> int:
        return self.events.count(name, **match)

    async def add(self, disk: str, image: Path, **fields: Any) -> tuple[dict[str, Any], str]:
        """``add`` a file-plugin disk; returns the agent's result and the guest's device."""
        before = await block_devices(self.vm)
        res = ok(await self.ctl.call("add", disk=disk, plugin="file",
                                     params={"file": str(image)}, **fields))
        dev = await wait_new_block_device(self.vm, before, timeout=SHOW_TIMEOUT)
        return res, dev

    async def disk(self, disk: str) -> dict[str, Any]:
        entries: list[dict[str, Any]] = ok(await self.ctl.call("list"))["disks"]
        [entry] = [d for d in entries if d["disk"] == disk]
        return entry


def random_image(path: Path, size: int) -> Path:
    return make_image(path, size, fill=os.urandom(size))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
async def lab(short_tmp: Path, nursery: trio.Nursery) -> AsyncIterator[Lab]:
    image = await trio.to_thread.run_sync(ensure_guest)
    config = short_tmp / "agent.toml"
    config.write_text(AGENT_CONFIG)
    agent: Agent | None = None
    leftovers: set[int] = set()
    try:
        async with open_guest_vm(image, short_tmp / "vm", boot_timeout=60) as vm:
            with trio.fail_after(30):
                agent = await start_agent(nursery, vm, short_tmp, "--config", str(config))
            try:
                async with open_control(agent.control) as ctl, \
                        open_qmp(vm.test_qmp_path) as mon:
                    assert ok(await ctl.call("subscribe")) == {"subscribed": True}
                    events = EventLog(ctl)
                    nursery.start_soon(events.pump)
                    yield Lab(vm, agent, ctl, events, mon, short_tmp)
            finally:
                leftovers = agent.descendants()
    finally:
        # QEMU is gone: the agent stops every nbdkit it still has and exits (3).
        if agent is not None:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(20):
                    await agent.proc.wait()
                if agent.proc.returncode is None:
                    agent.proc.kill()
                    await agent.proc.wait()
    left = [pid for pid in leftovers if alive(pid)]
    for pid in left:  # do not leak them, even when failing
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"
    assert agent.proc.returncode in (0, 3), agent.logs[-10:]


# ----------------------------------------------------------------------- data path


async def test_file_disks_carry_guest_data(lab: Lab) -> None:
    vm, ctl, mon = lab.vm, lab.ctl, lab.monitor
    with trio.fail_after(120):
        # A writable disk per driver: the guest sees it at the right size,
        # writes and reads back with O_DIRECT, and the bytes are in the image.
        sizes = {"virtio-blk-pci": 24 * MiB, "scsi-hd": 40 * MiB}
        devs: dict[str, str] = {}
        results: dict[str, dict[str, Any]] = {}
        for i, (driver, size) in enumerate(sizes.items()):
            image = make_image(lab.tmp / f"d{i}.img", size)
            t0 = trio.current_time()
            res, dev = await lab.add(f"d{i}", image, driver=driver)
            shown = trio.current_time() - t0
            assert res["size"] == size and res["driver"] == driver, res
            assert dev.startswith("vd" if driver == "virtio-blk-pci" else "sd"), dev
            assert await block_bytes(vm, dev) == size
            offset = size - 2 * MiB
            written, read = await write_read_verify(vm, dev, offset, MiB)
            assert written == read
            with image.open("rb") as f:
                f.seek(offset)
                assert hashlib.sha256(f.read(MiB)).hexdigest() == written
            devs[driver], results[driver] = dev, res
            print(f"{driver}: /dev/{dev} shown {shown * 1000:.0f} ms after add")

        # Read-only disks: readable, writes fail in the guest, the image is unchanged.
        ro_image = random_image(lab.tmp / "ro.img", 8 * MiB)
        ro_sum = sha256_file(ro_image)
        refusal = {"virtio-blk-pci": "Operation not permitted", "scsi-hd": "Read-only file system"}
        for driver, message in refusal.items():
            disk = f"ro{driver[0]}"
            res, ro_dev = await lab.add(disk, ro_image, readonly=True, driver=driver)
            assert res["readonly"] is True
            assert (await vm.check(f"cat /sys/block/{ro_dev}/ro")).strip() == "1"
            status, out = await vm.run(
                f"dd if=/dev/urandom of=/dev/{ro_dev} bs=4096 count=16 oflag=direct")
            assert status != 0 and message in out, (driver, out)
            status, out = await vm.run(f"dd if=/dev/zero of=/dev/{ro_dev} bs=4096 count=1")
            assert status != 0, (driver, out)
            out = await vm.check(f"dd if=/dev/{ro_dev} bs=1M iflag=direct 2>/dev/null | sha256sum")
            assert out.split()[0] == ro_sum
            assert sha256_file(ro_image) == ro_sum

        # remove of a virtio disk: the guest releases it, nothing is left.
        before_nodes = await node_names(mon)
        virtio = results["virtio-blk-pci"]
        assert ok(await ctl.call("remove", disk="d0")) == {"disk": "d0"}
        ev = await lab.wait_event("disk-removed", disk="d0")
        assert ev["reason"] == "request"
        await wait_gone(vm, devs["virtio-blk-pci"], timeout=10)
        assert virtio["node"] in before_nodes
        assert virtio["node"] not in await node_names(mon)
        assert virtio["device"] not in await peripherals(mon)
        assert not alive(virtio["pid"])
        assert not Path(virtio["socket"]).exists()

        # The others too; then the agent holds nothing at all.
        for disk in ("d1", "rov", "ros"):
            ok(await ctl.call("remove", disk=disk))
        assert ok(await ctl.call("list")) == {"disks": []}
        assert not {n for n in await node_names(mon) if n.startswith("nbdhp-")}
        assert not {d for d in await peripherals(mon) if d.startswith("nbdhp-")}
        assert list(lab.agent.runtime_dir.iterdir()) == []
        assert lab.agent.descendants() == set()
        assert await block_devices(vm) == set()
        assert await io_error_lines(vm) == []


async def test_guest_initiated_removal(lab: Lab) -> None:
    vm, ctl, mon = lab.vm, lab.ctl, lab.monitor
    with trio.fail_after(90):
        image = make_image(lab.tmp / "g.img", 8 * MiB)

        # Powering off the disk's PCI slot from inside the guest ejects it:
        # QEMU reports DEVICE_DELETED and the agent cleans up behind it.
        res, dev = await lab.add("gv", image)
        slot = await pci_slot_of(vm, dev)
        await vm.check(f"echo 0 > {slot}/power")
        ev = await lab.wait_event("disk-removed", disk="gv", timeout=15)
        assert ev["reason"] == "guest"
        await wait_gone(vm, dev, timeout=10)
        assert ok(await ctl.call("list")) == {"disks": []}
        assert res["node"] not in await node_names(mon)
        assert res["device"] not in await peripherals(mon)
        assert not alive(res["pid"])
        assert list(lab.agent.runtime_dir.iterdir()) == []

        # Deleting the SCSI disk in the guest, or removing the virtio disk's
        # PCI function, only changes the guest's view: QEMU keeps the device
        # (no DEVICE_DELETED), the disk stays "running", and a remove
        # through the agent still works afterwards.
        res_s, dev_s = await lab.add("gs", image, driver="scsi-hd")
        await vm.check(f"echo 1 > /sys/block/{dev_s}/device/delete")
        await wait_gone(vm, dev_s, timeout=10)
        res_v, dev_v = await lab.add("gp", image)
        pci_dev = (await vm.check(f"readlink -f /sys/block/{dev_v}/device/..")).strip()
        await vm.check(f"echo 1 > {pci_dev}/remove")
        await wait_gone(vm, dev_v, timeout=10)
        devices = await peripherals(mon)
        assert {res_s["device"], res_v["device"]} <= devices
        assert {d["disk"]: d["state"] for d in ok(await ctl.call("list"))["disks"]} == {
            "gs": "running", "gp": "running"}
        assert lab.count("disk-removed") == 1
        for disk in ("gs", "gp"):
            ok(await ctl.call("remove", disk=disk))
            ev = await lab.wait_event("disk-removed", disk=disk)
            assert ev["reason"] == "request"
        assert not {d for d in await peripherals(mon) if d.startswith("nbdhp-")}
        assert not {n for n in await node_names(mon) if n.startswith("nbdhp-")}
        assert lab.agent.descendants() == set()
        assert list(lab.agent.runtime_dir.iterdir()) == []


# ----------------------------------------------------------------------- crashes

KILLS = 12


async def test_guest_io_survives_nbdkit_kills(lab: Lab) -> None:
    vm = lab.vm
    with trio.fail_after(180):
        loops: dict[str, GuestLoop] = {}
        images: dict[str, Path] = {}
        pids: dict[str, int] = {}
        for disk, driver in (("kv", "virtio-blk-pci"), ("ks", "scsi-hd")):
            images[disk] = make_image(lab.tmp / f"{disk}.img", 16 * MiB)
            res, dev = await lab.add(disk, images[disk], driver=driver)
            pids[disk] = res["pid"]
            loops[disk] = GuestLoop(vm, dev, kind="verify", chunks=256, tag=disk)
            await loops[disk].start()
        for loop in loops.values():
            await loop.wait_iterations(2)

        downtimes = []
        for k in range(KILLS):
            disk = ("kv", "ks")[k % 2]
            os.kill(pids[disk], signal.SIGKILL)
            ev = await lab.wait_event("disk-recovered", disk=disk, timeout=20)
            assert ev["pid"] != pids[disk] and ev["restarts"] == k // 2 + 1, ev
            pids[disk] = ev["pid"]
            downtimes.append(ev["downtime_ms"])
            # The guest's I/O goes on: an iteration that began after the
            # recovery completes (and is verified below).
            await loops[disk].wait_iterations(1, after_ns=await guest_now_ns(vm))
        for loop in loops.values():
            await loop.stop()

        for disk, loop in loops.items():
            assert loop.records and not loop.failures and not loop.errors, (
                disk, loop.failures[:3], loop.errors[:3])
            for chunk, sha in loop.last_written().items():
                assert chunk_sha256(images[disk], chunk, loop.chunk_size) == sha, (disk, chunk)
        assert await io_error_lines(vm) == []
        for disk in loops:
            entry = await lab.disk(disk)
            assert entry["state"] == "running" and entry["pid"] == pids[disk]
            assert entry["restarts"] == KILLS // 2
            assert entry["last_exit"]["signal"] == "SIGKILL"
        assert lab.count("nbdkit-exited", signal="SIGKILL") == KILLS
        assert lab.count("disk-failed") == lab.count("io-error") == 0
        print(f"{KILLS} kills; agent downtime ms: {sorted(downtimes)}; "
              f"guest iterations verified: {sum(len(x.records) for x in loops.values())}")


async def _vm_status(mon: QMPClient) -> str:
    return str((await mon.execute("query-status"))["status"])


async def _ensure_running(lab: Lab, timeout: float) -> bool:
    """True if the guest answers within ``timeout`` (or the VM runs, just
    slowly); False if the VM was still paused and the test resumed it."""
    try:
        await lab.vm.check("true", timeout=timeout)
        return True
    except GuestCommandTimeout:
        pass
    status = await _vm_status(lab.monitor)
    if status == "running":
        return True
    assert status == "io-error", status
    # The agent's `cont` can come before QEMU's own NBD client has reconnected
    # (reconnect_delay 0: QEMU reconnects lazily, on the next request), so
    # the VM can pause again; the agent then resumes it again (bounded
    # retries).  Still paused here is a failure: resume it so that the test
    # can report it.
    await lab.monitor.execute("cont")
    await lab.vm.check("true", timeout=10)
    return False


async def test_werror_stop_pauses_and_agent_resumes(lab: Lab) -> None:
    """reconnect_delay 0 + werror/rerror stop: a crash pauses the VM (io-error)
    and the agent resumes it once nbdkit is back; the guest never sees an error."""
    vm, mon = lab.vm, lab.monitor
    stuck = 0

    async def ensure_running(timeout: float) -> bool:
        nonlocal stuck
        running = await _ensure_running(lab, timeout)
        stuck += not running
        return running

    with trio.fail_after(150):
        image = make_image(lab.tmp / "ws.img", 16 * MiB)
        res, dev = await lab.add("ws", image, werror="stop", rerror="stop", reconnect_delay=0)
        pid = res["pid"]
        # Back-to-back O_DIRECT writes of a known 4 MiB pattern, so that a
        # kill nearly always finds a request in flight.
        await vm.check(
            "dd if=/dev/urandom of=/tmp/pat bs=1M count=4 2>/dev/null\n"
            "rm -f /tmp/ws.stop; (while [ ! -e /tmp/ws.stop ]; do "
            f"dd if=/tmp/pat of=/dev/{dev} bs=64k oflag=direct 2>/tmp/ws.e "
            "|| { echo fail; cat /tmp/ws.e; }; done; echo done) >/tmp/ws.log 2>&1 </dev/null &")
        clean = 0
        for _ in range(6):
            resumed_before = lab.count("vm-resumed", disk="ws")
            os.kill(pid, signal.SIGKILL)
            err = await lab.wait_event("io-error", disk="ws", timeout=10)
            assert err["action"] == "stop" and err["operation"] == "write", err
            pid = (await lab.wait_event("disk-recovered", disk="ws", timeout=10))["pid"]
            if await ensure_running(5):
                # Someone resumed the VM, and not the test: the agent.
                await lab.events.wait_count("vm-resumed", resumed_before + 1, 5, disk="ws")
                clean += 1
        print(f"clean pause/resume cycles: {clean}; stuck (resumed by the test): {stuck}")
        assert (clean, stuck) == (6, 0), "the VM stayed paused after a recovery"
        assert lab.count("io-error", disk="ws") >= clean

        # A late io-error may still pause the VM (see above) until the loop stops.
        while not await ensure_running(3):
            pass
        await vm.check("touch /tmp/ws.stop")
        while True:
            try:
                await vm.wait_for("grep -q done /tmp/ws.log", timeout=10)
                break
            except GuestCommandTimeout:
                await ensure_running(1)
        assert (await vm.check("cat /tmp/ws.log")).strip() == "done"
        assert stuck == 0, "the VM stayed paused after a recovery"
        assert await io_error_lines(vm) == []
        out = await vm.check(
            f"dd if=/dev/{dev} bs=64k count=64 iflag=direct 2>/dev/null | sha256sum; "
            "sha256sum </tmp/pat")
        ours, pattern = (line.split()[0] for line in out.splitlines())
        assert ours == pattern
        assert hashlib.sha256(image.read_bytes()[: 4 * MiB]).hexdigest() == pattern
        assert (await lab.disk("ws"))["state"] == "running"
        assert await _vm_status(mon) == "running"


async def test_werror_stop_resumes_after_idle_crash(lab: Lab) -> None:
    """nbdkit crashes while the guest is idle: with reconnect_delay 0 QEMU fails
    the guest's next request even though nbdkit is back (its reconnect is lazy
    and does not wait), so the io-error comes after disk-recovered; the agent
    must resume the VM all the same."""
    vm, mon = lab.vm, lab.monitor
    with trio.fail_after(60):
        image = make_image(lab.tmp / "wl.img", 8 * MiB)
        res, dev = await lab.add("wl", image, werror="stop", rerror="stop", reconnect_delay=0)
        os.kill(res["pid"], signal.SIGKILL)
        await lab.wait_event("disk-recovered", disk="wl")
        await vm.check(f"(dd if=/dev/urandom of=/dev/{dev} bs=4k count=1 oflag=direct; "
                       "echo $? >/tmp/wl.rc) </dev/null >/dev/null 2>&1 &")
        try:
            err = await lab.wait_event("io-error", disk="wl", timeout=10)
            assert err["action"] == "stop"
            await lab.wait_event("vm-resumed", disk="wl", timeout=10)
            assert await _ensure_running(lab, 5)
        finally:
            with trio.CancelScope(shield=True):
                if await _vm_status(mon) != "running":
                    await mon.execute("cont")  # so that a failure leaves a usable VM
        assert (await vm.wait_for("cat /tmp/wl.rc", timeout=10)).strip() == "0"
        assert await io_error_lines(vm) == []
        assert await _vm_status(mon) == "running"
