"""End to end: nbdkit crashes, wedges and crash loops; QEMU going away.

A real QEMU, a real agent, real nbdkit processes killed with real signals;
guest-visible behaviour is checked with HMP ``qemu-io`` on the device (the
guest-kernel view is in test_e2e_guest.py).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

from agent.client import ControlClient, open_control
from contrib.guest.qmp import QMPClient
from tests.conftest import (
    Agent,
    Qemu,
    SpawnAgent,
    backend,
    make_image,
    node_names,
    ok,
    qemu_io,
)

pytestmark = pytest.mark.e2e

FAST_KILLS = """
# Kills in this test come faster than min_uptime: with the default (1 s)
# each would count as a crash-loop failure.  This measures recovery.
[restart]
min_uptime = 0.0
"""


def _image(tmp: Path, name: str = "disk.img", size: int = 8 << 20) -> Path:
    return make_image(tmp / name, size)


async def _event(ctl: ControlClient, name: str, timeout: float = 20) -> dict[str, object]:
    """The next event called ``name``; other events are skipped."""
    with trio.fail_after(timeout):
        while True:
            ev = await ctl.next_event()
            if ev["event"] == name:
                return ev


async def test_sigkill_loop_under_io_loses_nothing(qemu: Qemu, monitor: QMPClient,
                                                   short_tmp: Path,
                                                   spawn_agent: SpawnAgent) -> None:
    cfg = short_tmp / "agent.toml"
    cfg.write_text(FAST_KILLS)
    agent = await spawn_agent(qemu, "--config", str(cfg))
    image = _image(short_tmp)
    async with open_control(agent.control) as ctl:
        ok(await ctl.call("subscribe"))
        res = ok(await ctl.call("add", disk="k", plugin="file",
                                params={"file": str(image)}, driver="virtio-blk-pci"))
        dev = backend(res["device"])
        assert (await ctl.next_event())["event"] == "disk-added"
        pids = [res["pid"]]
        kills = 10
        for i in range(kills):
            pattern = 0x10 + i
            offset = i * 65536
            out = await qemu_io(qemu, monitor, dev, f"write -P {pattern} {offset} 64k")
            assert "wrote 65536/65536" in out, out
            os.kill(pids[-1], signal.SIGKILL)
            # The very next I/O spans the outage; it must succeed, not EIO.
            out = await qemu_io(qemu, monitor, dev, f"read -P {pattern} {offset} 64k")
            assert "read 65536/65536" in out and "failed" not in out, out
            exited = await ctl.next_event()
            assert (exited["event"], exited["signal"]) == ("nbdkit-exited", "SIGKILL"), exited
            recovered = await ctl.next_event()
            assert recovered["event"] == "disk-recovered", recovered
            assert recovered["restarts"] == i + 1
            assert recovered["pid"] not in pids
            assert isinstance(recovered["downtime_ms"], float)
            pids.append(recovered["pid"])
        # Every pattern written before a crash is still there, in the image too.
        for i in range(kills):
            out = await qemu_io(qemu, monitor, dev, f"read -P {0x10 + i} {i * 65536} 64k")
            assert "read 65536/65536" in out and "failed" not in out, out
        data = image.read_bytes()
        for i in range(kills):
            assert data[i * 65536:(i + 1) * 65536] == bytes([0x10 + i]) * 65536
        [disk] = ok(await ctl.call("list"))["disks"]
        assert disk["restarts"] == kills and disk["pid"] == pids[-1]
        assert disk["last_exit"]["signal"] == "SIGKILL"
        assert disk["state"] == "running"
        assert not any(Path(f"/proc/{p}").exists() for p in pids[:-1])
    assert await agent.stop() == 0


async def test_crash_loop_ends_failed_and_others_keep_working(
        agent: Agent, ctl: ControlClient, qemu: Qemu, monitor: QMPClient,
        short_tmp: Path) -> None:
    doomed = _image(short_tmp, "doomed.img")
    healthy = _image(short_tmp, "healthy.img")
    ok(await ctl.call("subscribe"))
    bad = ok(await ctl.call("add", disk="bad", plugin="file", params={"file": str(doomed)},
                            driver="scsi-hd"))
    good = ok(await ctl.call("add", disk="good", plugin="file",
                             params={"file": str(healthy)}, driver="scsi-hd"))
    doomed.unlink()
    os.kill(bad["pid"], signal.SIGKILL)
    start = trio.current_time()
    failed = await _event(ctl, "disk-failed", timeout=30)
    elapsed = trio.current_time() - start
    assert failed["disk"] == "bad"
    assert "doomed.img" in str(failed["reason"])
    assert elapsed < 15, elapsed
    listed = {d["disk"]: d for d in ok(await ctl.call("list"))["disks"]}
    assert listed["bad"]["state"] == "failed"
    assert listed["bad"]["pid"] is None
    assert listed["bad"]["restarts"] <= 5
    assert "No such file" in listed["bad"]["last_error"]
    assert listed["good"]["state"] == "running" and listed["good"]["pid"] == good["pid"]
    out = await qemu_io(qemu, monitor, good["device"], "write -P 0x77 0 64k")
    assert "wrote 65536/65536" in out, out

    # restart: fails again while the file is missing, recovers once it is back.
    ok(await ctl.call("restart", disk="bad"))
    await _event(ctl, "disk-failed", timeout=30)
    _image(short_tmp, "doomed.img")
    ok(await ctl.call("restart", disk="bad"))
    recovered = await _event(ctl, "disk-recovered", timeout=30)
    assert recovered["disk"] == "bad"
    assert ok(await ctl.call("list"))["disks"][0]["state"] == "running"
    ok(await ctl.call("remove", disk="bad"))
    assert "nbdhp-bad" not in await node_names(monitor)


async def test_failed_disk_can_be_removed(agent: Agent, ctl: ControlClient,
                                          monitor: QMPClient, short_tmp: Path) -> None:
    image = _image(short_tmp)
    res = ok(await ctl.call("add", disk="f", plugin="file", params={"file": str(image)},
                            driver="scsi-hd"))
    ok(await ctl.call("subscribe"))
    image.unlink()
    os.kill(res["pid"], signal.SIGKILL)
    await _event(ctl, "disk-failed", timeout=30)
    # QEMU's blockdev-del would wait out the whole reconnect-delay (30 s)
    # for a server that is gone; the agent's stand-in makes it immediate.
    start = trio.current_time()
    ok(await ctl.call("remove", disk="f"))
    assert trio.current_time() - start < 10
    assert "nbdhp-f" not in await node_names(monitor)
    assert agent.descendants() == set()
    assert list(agent.runtime_dir.iterdir()) == []


async def test_wedged_nbdkit_is_replaced(agent: Agent, ctl: ControlClient, qemu: Qemu,
                                         monitor: QMPClient, short_tmp: Path) -> None:
    image = _image(short_tmp)
    res = ok(await ctl.call("add", disk="w", plugin="file", params={"file": str(image)},
                            driver="scsi-hd"))
    ok(await ctl.call("subscribe"))
    os.kill(res["pid"], signal.SIGSTOP)  # alive, socket accepts, nobody answers
    exited = await _event(ctl, "nbdkit-exited", timeout=30)
    assert str(exited["reason"]).startswith("unresponsive"), exited
    recovered = await _event(ctl, "disk-recovered", timeout=30)
    assert recovered["pid"] != res["pid"]
    assert not Path(f"/proc/{res['pid']}").exists()
    out = await qemu_io(qemu, monitor, res["device"], "write -P 0x42 0 4k")
    assert "wrote 4096/4096" in out, out


async def test_device_deleted_behind_our_back_is_cleaned_up(
        agent: Agent, ctl: ControlClient, monitor: QMPClient) -> None:
    res = ok(await ctl.call("add", disk="ej", plugin="memory", params={"size": "4M"},
                            driver="scsi-hd"))
    ok(await ctl.call("subscribe"))
    await monitor.execute("device_del", {"id": res["device"]})
    removed = await _event(ctl, "disk-removed")
    assert (removed["disk"], removed["reason"]) == ("ej", "guest")
    assert ok(await ctl.call("list")) == {"disks": []}
    assert res["node"] not in await node_names(monitor)
    assert agent.descendants() == set()


async def test_qemu_exit_stops_every_nbdkit(agent: Agent, ctl: ControlClient,
                                            monitor: QMPClient) -> None:
    for name in ("q1", "q2"):
        ok(await ctl.call("add", disk=name, plugin="memory", params={"size": "4M"},
                          driver="scsi-hd"))
    assert len(agent.descendants()) == 4  # two keepers, two nbdkits
    await monitor.execute("quit")
    with trio.fail_after(20):
        status = await agent.proc.wait()
    assert status == 3
    await agent.wait_log("qemu-gone")
    assert agent.descendants() == set()
    assert not agent.control.exists()
    assert list(agent.runtime_dir.iterdir()) == []


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_memory_stays_flat_under_many_qmp_events(agent: Agent, ctl: ControlClient,
                                                       monitor: QMPClient) -> None:
    async def churn(pairs: int) -> None:
        for _ in range(pairs):
            await monitor.execute("stop")
            await monitor.execute("cont")
        await monitor.execute("stop")
        # The agent has read everything once it answers a QMP-backed request.
        assert ok(await ctl.call("ping"))

    await churn(1000)  # warm-up: allocator pools, caches
    before = _rss_kib(agent.proc.pid)
    await churn(5000)  # 10,000 more STOP/RESUME events
    after = _rss_kib(agent.proc.pid)
    # qemu.qmp's default listener would keep every event (history + queue):
    # about 10 MB here.  Flat means within allocator noise.
    assert after - before < 2048, (before, after)
