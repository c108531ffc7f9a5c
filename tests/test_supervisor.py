"""The per-disk supervisor against real nbdkit processes (no QEMU needed)."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from agent import nbd
from agent.config import Config, RestartPolicy
from agent.errors import NbdkitFailed
from agent.supervisor import ProcState, Supervisor


def _config(tmp: Path, **kw: Any) -> Config:
    return dataclasses.replace(
        Config(qmp_path=tmp / "q", control_path=tmp / "c", runtime_dir=tmp), **kw)


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self._send, self._recv = trio.open_memory_channel[tuple[str, dict[str, Any]]](100)

    def __call__(self, name: str, **fields: Any) -> None:
        self.seen.append((name, fields))
        self._send.send_nowait((name, fields))

    async def wait(self, name: str, timeout: float = 20) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while True:
                got, fields = await self._recv.receive()
                if got == name:
                    return fields


def _memory(sock: Path, config: Config, events: Events, **kw: Any) -> Supervisor:
    argv = ["nbdkit", "--foreground", "--", "memory", "size=1M"]
    return Supervisor("d", sock, argv, config, events, **kw)


async def test_first_start_failure_reports_stderr(short_tmp: Path) -> None:
    sup = Supervisor("d", short_tmp / "d.sock",
                     ["nbdkit", "--foreground", "--", "file", "file=/no/such/file"],
                     _config(short_tmp), Events())
    async with trio.open_nursery() as nursery:
        with pytest.raises(NbdkitFailed) as info:
            await nursery.start(sup.run)
    assert "/no/such/file" in info.value.message
    assert "/no/such/file" in info.value.context["stderr"]
    assert not (short_tmp / "d.sock").exists()


async def test_restart_on_same_socket_serves_waiting_client(short_tmp: Path) -> None:
    sock = short_tmp / "d.sock"
    events = Events()
    sup = _memory(sock, _config(short_tmp, health_interval=0), events)
    async with trio.open_nursery() as nursery:
        pid = await nursery.start(sup.run)
        assert await nbd.probe_export(sock) == 1 << 20
        os.kill(pid, signal.SIGKILL)
        # Connect at once: nothing may refuse it while nbdkit is replaced.
        with trio.fail_after(10):
            assert await nbd.probe_export(sock) == 1 << 20
        exited = await events.wait("nbdkit-exited")
        assert exited["signal"] == "SIGKILL" and exited["code"] is None
        recovered = await events.wait("disk-recovered")
        assert recovered["pid"] != pid and recovered["restarts"] == 1
        assert sup.state is ProcState.RUNNING and sup.pid == recovered["pid"]
        nursery.cancel_scope.cancel()
    assert sup.state is ProcState.STOPPED
    assert not sock.exists()
    assert not Path(f"/proc/{recovered['pid']}").exists()


async def test_crash_loop_goes_failed_then_restart(short_tmp: Path) -> None:
    image = short_tmp / "img"
    image.write_bytes(b"\0" * 4096)
    policy = RestartPolicy(max_failures=3, window=60, min_uptime=1.0, backoff_initial=0.05)
    events = Events()
    sup = Supervisor("d", short_tmp / "d.sock",
                     ["nbdkit", "--foreground", "--", "file", f"file={image}"],
                     _config(short_tmp, restart=policy, health_interval=0), events)
    async with trio.open_nursery() as nursery:
        pid = await nursery.start(sup.run)
        image.unlink()
        os.kill(pid, signal.SIGKILL)
        start = trio.current_time()
        failed = await events.wait("disk-failed")
        # 3 failures: immediate, then 0.05 s, then give up.
        assert trio.current_time() - start >= 0.05
        assert "No such file" in failed["reason"]
        assert sup.state is ProcState.FAILED and sup.pid is None
        assert sup.restarts == 2
        assert [n for n, _ in events.seen].count("nbdkit-exited") == 3
        image.write_bytes(b"\0" * 4096)
        sup.request_restart()
        recovered = await events.wait("disk-recovered")
        assert sup.state is ProcState.RUNNING and recovered["restarts"] == 3
        nursery.cancel_scope.cancel()


async def test_wedged_nbdkit_is_killed_and_replaced(short_tmp: Path) -> None:
    events = Events()
    sup = _memory(short_tmp / "d.sock",
                  _config(short_tmp, health_interval=0.2, health_timeout=0.5), events)
    async with trio.open_nursery() as nursery:
        pid = await nursery.start(sup.run)
        os.kill(pid, signal.SIGSTOP)
        exited = await events.wait("nbdkit-exited")
        assert exited["reason"].startswith("unresponsive") and exited["signal"] == "SIGKILL"
        recovered = await events.wait("disk-recovered")
        assert recovered["pid"] != pid
        nursery.cancel_scope.cancel()


async def test_detach_leaves_nbdkit_serving(short_tmp: Path) -> None:
    sock = short_tmp / "d.sock"
    sup = _memory(sock, _config(short_tmp, health_interval=0), Events())
    async with trio.open_nursery() as nursery:
        pid = await nursery.start(sup.run)
        sup.detach = True
        nursery.cancel_scope.cancel()
    try:
        assert sock.exists()
        assert await nbd.probe_export(sock) == 1 << 20
    finally:
        assert sup.detached is not None and sup.detached.pid == pid
        sup.detached.kill()
        await sup.detached.wait()
