"""Fixtures that drive real processes: QEMU (q35, TCG, no guest) and the agent.

Every socket lives in a short private dir under /tmp (sun_path is 107 bytes).
Readiness is awaited on real conditions (QMP accepting, the agent's
``agent-ready`` log line), never on fixed sleeps.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from agent.client import ControlClient, open_control
from contrib import lab
from contrib.agentproc import AgentProcess, descendants_of, wait_connectable
from contrib.guest.qmp import QMPClient, open_qmp
from contrib.lab import sandbox_owner

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nh-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Qemu:
    """A real qemu-system-x86_64: q35, TCG, no guest, two QMP monitors.

    Its stdout is collected line by line: that is where HMP ``qemu-io``
    prints its results.
    """

    def __init__(self, proc: trio.Process, qmp_path: Path, test_qmp_path: Path) -> None:
        self.proc = proc
        self.qmp_path = qmp_path
        self.test_qmp_path = test_qmp_path
        self.lines: list[str] = []
        self._changed = trio.Event()

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        buf = b""
        async for chunk in self.proc.stdout:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            self.lines += [x.decode(errors="replace") for x in lines]
            self._changed.set()
            self._changed = trio.Event()

    async def wait_line(self, start: int, done: Callable[[str], bool],
                        timeout: float = 30) -> list[str]:
        """Lines printed since index ``start``, once one of them satisfies ``done``."""
        with trio.fail_after(timeout):
            while not any(done(x) for x in self.lines[start:]):
                await self._changed.wait()
        return self.lines[start:]


@asynccontextmanager
async def open_qemu(tmp: Path, nursery: trio.Nursery, machine: str = "q35"
                    ) -> AsyncIterator[Qemu]:
    """QEMU with no guest: q35 gets four free root ports, i440fx ("pc") none."""
    qmp_path, test_path = tmp / "qmp.sock", tmp / "qmp-test.sock"
    argv = [
        "qemu-system-x86_64", "-machine", machine, "-accel", "tcg", "-nodefaults",
        "-display", "none", "-m", "128", "-S",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
        "-qmp", f"unix:{test_path},server=on,wait=off",
        "-device", "virtio-scsi-pci,id=scsi0",
    ]
    if machine == "q35":
        for i in range(1, 5):
            argv += ["-device", f"pcie-root-port,id=rp{i},chassis={i},slot={i},port={i}"]
    # stdbuf: qemu-io's printf output must not sit in a stdio buffer.
    proc = await trio.lowlevel.open_process(["stdbuf", "-oL", *argv],
                                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    qemu = Qemu(proc, qmp_path, test_path)
    try:
        nursery.start_soon(qemu._read_stdout)
        await wait_connectable(test_path)
        yield qemu
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.terminate()
                with trio.move_on_after(10):
                    await proc.wait()
                proc.kill()
            await proc.wait()


@pytest.fixture
async def qemu(short_tmp: Path, nursery: trio.Nursery) -> AsyncIterator[Qemu]:
    async with open_qemu(short_tmp, nursery) as q:
        yield q


@pytest.fixture
async def monitor(qemu: Qemu) -> AsyncIterator[QMPClient]:
    """The test's own QMP monitor (the agent has the other one)."""
    async with open_qmp(qemu.test_qmp_path) as client:
        yield client


class Agent(AgentProcess):
    """A real agent process (``python -m agent serve``) and its log lines."""

    def __init__(self, proc: trio.Process, control: Path, runtime_dir: Path) -> None:
        super().__init__(proc, control, runtime_dir)
        self.left_behind: set[int] = set()

    async def stop(self) -> int:
        """SIGTERM; returns the exit status.  What it leaves running is noted
        (``left_behind``) for ``reap_agent``."""
        self.left_behind |= self.descendants()
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            return await self.proc.wait()


def sandbox_user() -> tuple[int, int]:
    """The uid/gid the agent (as root) runs nbdkit as."""
    owner = sandbox_owner()
    assert owner is not None, "the sandbox user exists only for a root agent"
    return owner


def make_image(path: Path, size: int = 8 << 20, fill: bytes = b"") -> Path:
    """A disk image the sandboxed nbdkit may read and write."""
    return lab.make_image(path, size, fill)


async def start_agent(nursery: trio.Nursery, qemu: Any, tmp: Path,
                      *extra: str) -> Agent:
    """A real agent on ``qemu.qmp_path``; the file plugin may serve from ``tmp``."""
    control, runtime = tmp / "ctl.sock", tmp / "run"
    argv = [sys.executable, "-m", "agent", "serve", "--qmp", str(qemu.qmp_path),
            "--control", str(control), "--runtime-dir", str(runtime),
            "--file-dir", str(tmp), "--log-level", "debug", *extra]
    proc = await trio.lowlevel.open_process(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    agent = Agent(proc, control, runtime)
    await nursery.start(agent._read_stderr)
    return agent


async def reap_agent(agent: Agent) -> None:
    """Stop the agent and everything it left running (keepers, nbdkit).

    An agent that exits on SIGTERM leaves attached disks serving, by design;
    a test must not leave them behind.
    """
    left = agent.descendants() | agent.left_behind
    if agent.proc.returncode is None:
        agent.proc.kill()
    await agent.proc.wait()
    left |= descendants_of(left)
    pidfds = []
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            pidfds.append(os.pidfd_open(pid))
            os.kill(pid, signal.SIGKILL)
    try:
        with trio.move_on_after(10):
            for fd in pidfds:  # readable once that process has exited
                await trio.lowlevel.wait_readable(fd)
    finally:
        for fd in pidfds:
            os.close(fd)


SpawnAgent = Callable[..., Awaitable[Agent]]


@pytest.fixture
async def spawn_agent(short_tmp: Path, nursery: trio.Nursery) -> AsyncIterator[SpawnAgent]:
    """``await spawn_agent(qemu_like, *extra_args)``; every agent is reaped at the end."""
    started: list[Agent] = []

    async def spawn(qemu: Any, *extra: str) -> Agent:
        agent = await start_agent(nursery, qemu, short_tmp, *extra)
        started.append(agent)
        return agent

    try:
        yield spawn
    finally:
        with trio.CancelScope(shield=True):
            for agent in started:
                await reap_agent(agent)


@pytest.fixture
async def agent(qemu: Qemu, spawn_agent: SpawnAgent) -> Agent:
    return await spawn_agent(qemu, "--health-interval", "1")


@pytest.fixture
async def ctl(agent: Agent) -> AsyncIterator[ControlClient]:
    async with open_control(agent.control) as client:
        yield client


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    """The result of a successful reply (fails the test with the error otherwise)."""
    assert reply["ok"], reply
    result: dict[str, Any] = reply["result"]
    return result


def error_code(reply: dict[str, Any]) -> str:
    assert not reply["ok"], reply
    return str(reply["error"]["code"])


def _qemu_io_done(line: str) -> bool:
    return line.startswith(("wrote ", "read ")) or "failed" in line


async def qemu_io(qemu: Qemu, monitor: QMPClient, device_path: str, command: str) -> str:
    """Real I/O through the device's block backend via HMP qemu-io.

    Returns what qemu-io printed (on QEMU's stdout), or the monitor's error.
    """
    start = len(qemu.lines)
    out = await monitor.execute("human-monitor-command", {
        "command-line": f'qemu-io -d {device_path} "{command}"'})
    if out:
        return str(out)
    return "\n".join(await qemu.wait_line(start, _qemu_io_done))


def backend(device: str, driver: str = "virtio-blk-pci") -> str:
    """qemu-io -d needs the QOM path of the device that owns the BlockBackend."""
    if driver == "virtio-blk-pci":
        return f"/machine/peripheral/{device}/virtio-backend"
    return device


async def node_names(monitor: QMPClient) -> set[str]:
    nodes = await monitor.execute("query-named-block-nodes", {"flat": True})
    return {n["node-name"] for n in nodes}


async def peripherals(monitor: QMPClient) -> set[str]:
    items = await monitor.execute("qom-list", {"path": "/machine/peripheral"})
    return {i["name"] for i in items if i["type"].startswith("child<")}
