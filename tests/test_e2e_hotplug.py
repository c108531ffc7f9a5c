"""End to end: a real QEMU, a real agent, real nbdkit; checked from outside.

QEMU's state is read through a second QMP monitor of the test's own, the
process table through /proc, the runtime dir through the file system.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from agent.client import ControlClient, open_control
from contrib.guest.qmp import QMPClient, open_qmp
from tests.conftest import (
    Agent,
    Qemu,
    SpawnAgent,
    backend,
    error_code,
    make_image,
    node_names,
    ok,
    open_qemu,
    peripherals,
    qemu_io,
)

pytestmark = pytest.mark.e2e


async def test_ping_reports_versions(ctl: ControlClient, monitor: QMPClient) -> None:
    result = ok(await ctl.call("ping"))
    version = await monitor.execute("query-version")
    assert result["qemu"].startswith(
        f"{version['qemu']['major']}.{version['qemu']['minor']}.{version['qemu']['micro']}")
    assert result["version"]


@pytest.mark.parametrize("driver", ["virtio-blk-pci", "scsi-hd"])
async def test_file_disk_data_reaches_image(ctl: ControlClient, monitor: QMPClient, qemu: Qemu,
                                            short_tmp: Path, driver: str) -> None:
    image = make_image(short_tmp / "disk.img")
    res = ok(await ctl.call("add", disk="f1", plugin="file", params={"file": str(image)},
                            driver=driver))
    assert res["state"] == "running" and res["driver"] == driver
    assert res["node"] in await node_names(monitor)
    assert res["device"] in await peripherals(monitor)
    assert res["size"] == 8 << 20
    assert Path(f"/proc/{res['pid']}/cmdline").read_bytes().split(b"\0")[0].endswith(b"nbdkit")

    dev = backend(res["device"], driver)
    out = await qemu_io(qemu, monitor, dev, "write -P 0x5a 1M 64k")
    assert "wrote 65536/65536 bytes" in out, out
    out = await qemu_io(qemu, monitor, dev, "read -P 0x5a 1M 64k")
    assert "read 65536/65536 bytes" in out, out
    out = await qemu_io(qemu, monitor, dev, "read -P 0x5b 1M 64k")
    assert "Pattern verification failed" in out, out
    with image.open("rb") as f:
        f.seek(1 << 20)
        assert f.read(65536) == b"\x5a" * 65536

    listed = ok(await ctl.call("list"))["disks"]
    assert [(d["disk"], d["plugin"], d["state"], d["pid"], d["readonly"]) for d in listed] == [
        ("f1", "file", "running", res["pid"], False)]


async def test_memory_disk_readonly(ctl: ControlClient, monitor: QMPClient,
                                    qemu: Qemu) -> None:
    res = ok(await ctl.call("add", disk="m1", plugin="memory", params={"size": "16M"},
                            readonly=True, driver="scsi-hd"))
    assert res["readonly"] is True
    nodes = await monitor.execute("query-named-block-nodes", {"flat": True})
    node = next(n for n in nodes if n["node-name"] == res["node"])
    assert node["ro"] is True
    out = await qemu_io(qemu, monitor, res["device"], "write -P 0x11 0 4k")
    assert "wrote" not in out and "read-only" in out, out
    assert "read 4096/4096 bytes" in await qemu_io(qemu, monitor, res["device"], "read -P 0 0 4k")


async def test_remove_leaves_nothing(agent: Agent, ctl: ControlClient, monitor: QMPClient,
                                     short_tmp: Path) -> None:
    sub = ok(await ctl.call("subscribe"))
    assert sub == {"subscribed": True}
    before_nodes = await node_names(monitor)
    res = ok(await ctl.call("add", disk="gone", plugin="memory", params={"size": "8M"},
                            driver="scsi-hd"))
    pid = res["pid"]
    assert Path(res["socket"]).exists()
    assert agent.descendants()
    added = await ctl.next_event()
    assert (added["event"], added["disk"], added["pid"]) == ("disk-added", "gone", pid)

    assert ok(await ctl.call("remove", disk="gone")) == {"disk": "gone"}
    removed = await ctl.next_event()
    assert (removed["event"], removed["disk"]) == ("disk-removed", "gone")
    assert await node_names(monitor) == before_nodes
    assert "nbdhp-dev-gone" not in await peripherals(monitor)
    assert not Path(f"/proc/{pid}").exists()
    assert agent.descendants() == set()
    assert list(agent.runtime_dir.iterdir()) == []
    assert ok(await ctl.call("list")) == {"disks": []}
    assert error_code(await ctl.call("remove", disk="gone")) == "not-found"


async def test_virtio_unplug_timeout_keeps_disk_removing(
        qemu: Qemu, short_tmp: Path, spawn_agent: SpawnAgent, monitor: QMPClient) -> None:
    # No guest OS: nobody answers the PCIe unplug request.
    agent = await spawn_agent(qemu, "--unplug-timeout", "0.5")
    try:
        async with open_control(agent.control) as ctl:
            ok(await ctl.call("add", disk="v1", plugin="memory", params={"size": "8M"}))
            reply = await ctl.call("remove", disk="v1")
            assert error_code(reply) == "unplug-timeout"
            [disk] = ok(await ctl.call("list"))["disks"]
            assert disk["state"] == "removing" and disk["pid"] is not None
            # A retry does not fail on "already in the process of unplug".
            assert error_code(await ctl.call("remove", disk="v1")) == "unplug-timeout"
            assert "nbdhp-v1" in await node_names(monitor)
    finally:
        assert await agent.stop() == 0


async def test_every_error_code(ctl: ControlClient, agent: Agent, monitor: QMPClient,
                                short_tmp: Path) -> None:
    async def code_of(raw: bytes) -> str:
        await ctl.send_raw(raw)
        return await _next_reply_code(ctl)

    assert await code_of(b"{not json\n") == "bad-request"
    assert await code_of(b"[1, 2]\n") == "bad-request"
    assert await code_of(b'{"op": 7}\n') == "bad-request"
    assert await code_of(b'{"op": "add", "plugin": "file", "params": {"file": 1}}\n') \
        == "bad-request"
    assert await code_of(b'{"op": "add"}\n') == "bad-request"
    assert await code_of(b'{"op": "ping", "extra": 1}\n') == "bad-request"
    assert await code_of(b'{"op": "add", "disk": "-x", "plugin": "memory"}\n') == "bad-request"
    assert await code_of(b'{"op": "launch-missiles"}\n') == "unknown-op"
    assert await code_of(b"[" * 100_000 + b"]" * 100_000 + b"\n") == "bad-request"
    assert await code_of(b'{"op": "ping", "pad": "' + b"x" * (1 << 20) + b'"}\n') \
        == "line-too-long"

    assert error_code(await ctl.call("remove", disk="nope")) == "not-found"
    assert error_code(await ctl.call("restart", disk="nope")) == "not-found"
    assert error_code(await ctl.call("add", plugin="sh", params={"script": "x"})) \
        == "plugin-not-allowed"
    assert error_code(await ctl.call("add", plugin="memory", params={"size": "1M"},
                                     filters=["log"])) == "filter-not-allowed"
    assert error_code(await ctl.call("add", plugin="nbd", params={"command": "id"})) \
        == "param-not-allowed"
    missing = short_tmp / "missing.img"
    err = (await ctl.call("add", plugin="file", params={"file": str(missing)}))["error"]
    assert err["code"] == "nbdkit-failed" and str(missing) in err["message"]
    assert error_code(await ctl.call("add", plugin="file", params={"file": "/etc/shadow"})) \
        == "path-not-allowed"
    assert error_code(await ctl.call("add", plugin="file",
                                     params={"file": f"{short_tmp}/../../etc/shadow"})) \
        == "path-not-allowed"
    if os.geteuid() == 0:
        private = short_tmp / "private.img"
        private.write_bytes(b"\0" * 4096)
        private.chmod(0o600)  # root's, not the sandbox user's
        assert error_code(await ctl.call("add", plugin="file",
                                         params={"file": str(private)})) == "permission-denied"

    ok(await ctl.call("add", disk="dup", plugin="memory", params={"size": "1M"},
                      driver="scsi-hd"))
    assert error_code(await ctl.call("add", disk="dup", plugin="memory",
                                     params={"size": "1M"})) == "exists"
    assert error_code(await ctl.call("restart", disk="dup")) == "invalid-state"

    # qmp-error: QEMU itself refuses (a node name is taken behind our back).
    await monitor.execute("blockdev-add", {"driver": "null-co", "node-name": "nbdhp-taken"})
    reply = await ctl.call("add", disk="taken", plugin="memory", params={"size": "1M"})
    assert error_code(reply) == "qmp-error"
    assert reply["error"]["qmp_class"] == "GenericError"

    # no-free-slot: occupy every free root port.
    for i in range(1, 5):
        await monitor.execute("blockdev-add", {"driver": "null-co", "node-name": f"fill{i}"})
        await monitor.execute("device_add", {"driver": "virtio-blk-pci", "id": f"fill{i}",
                                             "drive": f"fill{i}", "bus": f"rp{i}"})
    assert error_code(await ctl.call("add", plugin="memory", params={"size": "1M"})) \
        == "no-free-slot"

    # After all that the agent still serves, and only "dup" exists.
    assert ok(await ctl.call("ping"))["version"]
    assert [d["disk"] for d in ok(await ctl.call("list"))["disks"]] == ["dup"]
    assert agent.proc.returncode is None


async def _next_reply_code(ctl: ControlClient) -> str:
    with trio.fail_after(10):
        return error_code(await ctl.next_reply())


async def test_failed_add_leaves_nothing(agent: Agent, ctl: ControlClient,
                                         monitor: QMPClient) -> None:
    # nbdkit starts and blockdev-add succeeds, but the device has no place.
    for i in range(1, 5):
        await monitor.execute("blockdev-add", {"driver": "null-co", "node-name": f"fill{i}"})
        await monitor.execute("device_add", {"driver": "virtio-blk-pci", "id": f"fill{i}",
                                             "drive": f"fill{i}", "bus": f"rp{i}"})
    before_nodes, before_devs = await node_names(monitor), await peripherals(monitor)
    reply = await ctl.call("add", disk="half", plugin="memory", params={"size": "1M"})
    assert error_code(reply) == "no-free-slot"
    # device_add refused by QEMU after blockdev-add succeeded: the device id
    # is taken behind the agent's back.
    await monitor.execute("blockdev-add", {"driver": "null-co", "node-name": "other"})
    await monitor.execute("device_add", {"driver": "scsi-hd", "id": "nbdhp-dev-half2",
                                         "drive": "other", "bus": "scsi0.0"})
    before_nodes, before_devs = await node_names(monitor), await peripherals(monitor)
    reply = await ctl.call("add", disk="half2", plugin="memory", params={"size": "1M"},
                           driver="scsi-hd")
    assert error_code(reply) == "qmp-error"
    assert "nbdhp-dev-half2" in reply["error"]["message"]
    assert await node_names(monitor) == before_nodes
    assert await peripherals(monitor) == before_devs
    assert agent.descendants() == set()
    assert list(agent.runtime_dir.iterdir()) == []
    assert ok(await ctl.call("list")) == {"disks": []}


async def test_concurrent_clients(agent: Agent, monitor: QMPClient) -> None:
    results: dict[int, Any] = {}

    async def client(i: int) -> None:
        async with open_control(agent.control) as ctl:
            res = ok(await ctl.call("add", disk=f"c{i}", plugin="memory",
                                    params={"size": "4M"}, driver="scsi-hd"))
            results[i] = res
            assert f"c{i}" in [d["disk"] for d in ok(await ctl.call("list"))["disks"]]

    async with open_control(agent.control) as slow:
        # A client that sends half a line and stalls must not block anyone.
        await slow.send_raw(b'{"op": "pi')
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(client, i)
        await slow.send_raw(b'ng", "id": "late"}\n')
        assert ok(await slow.call("ping"))
    assert sorted(results) == [0, 1, 2, 3]
    assert len({r["pid"] for r in results.values()}) == 4
    nodes = await node_names(monitor)
    assert {f"nbdhp-c{i}" for i in range(4)} <= nodes
    for i in range(4):
        async with open_control(agent.control) as ctl:
            ok(await ctl.call("remove", disk=f"c{i}"))
    assert agent.descendants() == set()


async def test_sigterm_exits_zero_and_leaves_disks(qemu: Qemu, short_tmp: Path,
                                                  spawn_agent: SpawnAgent,
                                                  monitor: QMPClient) -> None:
    agent = await spawn_agent(qemu)
    async with open_control(agent.control) as ctl:
        res = ok(await ctl.call("add", disk="stay", plugin="memory", params={"size": "4M"},
                                driver="scsi-hd"))
    assert await agent.stop() == 0
    assert not agent.control.exists()
    # Documented behaviour: the disk stays attached and nbdkit keeps serving.
    assert "nbdhp-stay" in await node_names(monitor)
    assert Path(f"/proc/{res['pid']}").exists()
    assert "read 4096/4096" in await qemu_io(qemu, monitor, res["device"], "read 0 4k")
    await monitor.execute("device_del", {"id": res["device"]})
    await monitor.wait_event("DEVICE_DELETED", match={"device": res["device"]})
    await monitor.execute("blockdev-del", {"node-name": res["node"]})
    os.kill(res["pid"], 9)


async def test_refuses_live_control_socket(agent: Agent, qemu: Qemu) -> None:
    with trio.fail_after(30):
        proc = await trio.run_process(
            [sys.executable, "-m", "agent", "serve", "--qmp", str(qemu.qmp_path),
             "--control", str(agent.control)], capture_stderr=True, check=False)
    assert proc.returncode == 1
    lines = [json.loads(x) for x in proc.stderr.splitlines()]
    assert any("in use" in line.get("error", "") for line in lines), lines
    assert ok(await _ping(agent))


async def test_replaces_stale_control_socket_and_rejects_bad_qmp(
        qemu: Qemu, short_tmp: Path, spawn_agent: SpawnAgent) -> None:
    stale = short_tmp / "ctl.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(stale))
    sock.close()  # the file stays, nobody listens: stale
    agent = await spawn_agent(qemu)
    assert oct(agent.control.stat().st_mode & 0o777) == "0o600"
    assert oct(agent.runtime_dir.stat().st_mode & 0o777) == "0o700"
    assert ok(await _ping(agent))
    assert await agent.stop() == 0

    with trio.fail_after(30):
        proc = await trio.run_process(
            [sys.executable, "-m", "agent", "serve", "--qmp", str(short_tmp / "nothing"),
             "--control", str(short_tmp / "c2.sock")], capture_stderr=True, check=False)
    assert proc.returncode == 1
    assert b"cannot attach to QMP" in proc.stderr
    assert not (short_tmp / "c2.sock").exists()

    # Something that answers, but is not QEMU.
    async def not_qmp(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b'{"hello": "I am not QEMU"}\n')
            await trio.sleep_forever()

    fake = trio.socket.socket(socket.AF_UNIX)
    await fake.bind(str(short_tmp / "fake.sock"))
    fake.listen(4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, not_qmp, [trio.SocketListener(fake)])
        with trio.fail_after(30):
            proc = await trio.run_process(
                [sys.executable, "-m", "agent", "serve", "--qmp", str(short_tmp / "fake.sock"),
                 "--control", str(short_tmp / "c3.sock")], capture_stderr=True, check=False)
        nursery.cancel_scope.cancel()
    assert proc.returncode == 1
    assert b"cannot attach to QMP" in proc.stderr, proc.stderr


async def _ping(agent: Agent) -> dict[str, Any]:
    async with open_control(agent.control) as ctl:
        return await ctl.call("ping")


async def test_i440fx_root_bus(short_tmp: Path, nursery: trio.Nursery,
                               spawn_agent: SpawnAgent) -> None:
    async with open_qemu(short_tmp, nursery, machine="pc") as pc:
        agent = await spawn_agent(pc, "--unplug-timeout", "0.5")
        async with open_control(agent.control) as ctl, open_qmp(pc.test_qmp_path) as mon:
            res = ok(await ctl.call("add", disk="p1", plugin="memory", params={"size": "4M"}))
            assert res["bus"] == "pci.0"
            out = await qemu_io(pc, mon, backend(res["device"]), "write -P 0x33 0 4k")
            assert "wrote 4096/4096" in out, out
            assert "read 4096/4096" in await qemu_io(pc, mon, backend(res["device"]),
                                                     "read -P 0x33 0 4k")
            # No guest OS answers the ACPI unplug request on i440fx either.
            assert error_code(await ctl.call("remove", disk="p1")) == "unplug-timeout"
