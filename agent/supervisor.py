"""One nbdkit per disk, kept alive: start, readiness, health, restart, give up.

``Supervisor.run`` owns the disk's listening socket for the disk's whole life
and hands it to each nbdkit incarnation (see ``agent.nbdkit``).  The exit of
an incarnation is noticed at once (trio waits on a pidfd, no polling) and a
new one is started on the same socket; QEMU's NBD client, whose reconnect
``connect()`` sits in the listen backlog meanwhile, resumes by itself.

States (``ProcState``)::

    starting --ready--> running --exit--> restarting --ready--> running
                                              |
                         too many failures in the window
                                              v
                                           failed --restart op--> restarting
    (any) --cancelled--> stopped

Cancellation of ``run`` stops nbdkit (SIGTERM, grace, SIGKILL, always
reaped) and removes the socket, unless ``detach`` was set: then the running
nbdkit is left serving on its socket (used when the agent exits on SIGTERM).
"""

from __future__ import annotations

import enum
import functools
import os
import signal
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import trio

from agent import nbd, nbdkit
from agent.config import Config
from agent.errors import InvalidState, NbdkitFailed
from agent.sandbox import Plan

#: No confinement at all (unit tests of the supervisor, debugging).
UNCONFINED = Plan(prefix=[], shell="", filters=[], filter_params=[], pipes={}, bwrap=False,
                  layers={})

STDERR_TAIL = 4096

EmitFn = Callable[..., None]


class ProcState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ExitInfo:
    """How one nbdkit incarnation ended."""

    code: int | None
    signal: str | None
    reason: str
    stderr: str
    at: float  # wall-clock seconds

    def describe(self) -> str:
        how = f"signal {self.signal}" if self.signal else f"exit code {self.code}"
        return f"{self.reason} ({how})"

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "signal": self.signal, "reason": self.reason,
                "at": self.at}


class _Tail:
    """The last ``limit`` bytes of a stream, as text."""

    def __init__(self, limit: int = STDERR_TAIL) -> None:
        self.limit = limit
        self.buf = bytearray()

    def add(self, data: bytes) -> None:
        self.buf += data
        del self.buf[: max(0, len(self.buf) - self.limit)]

    def text(self) -> str:
        return self.buf.decode("utf-8", "replace").strip()


class Supervisor:
    """Keeps one disk's nbdkit serving on one socket."""

    def __init__(self, disk: str, socket_path: Path, argv: list[str], config: Config,
                 emit: EmitFn, *, plan: Plan | None = None,
                 secrets: Mapping[str, str] | None = None,
                 standin: tuple[list[str], Plan] | None = None) -> None:
        self.disk = disk
        self.socket_path = socket_path
        self.argv = argv
        self.plan = plan if plan is not None else UNCONFINED
        # Kept in memory only, to start each new incarnation with them.
        self._secrets = dict(secrets or {})
        # argv (without the size) and plan of an empty export; see standin()
        self._standin = standin
        self._listener: socket.socket | None = None
        self.config = config
        self.policy = config.restart
        self._emit = emit
        self.state = ProcState.STARTING
        self.pid: int | None = None
        self.size: int | None = None
        self.restarts = 0
        self.last_exit: ExitInfo | None = None
        self.last_error: str | None = None
        self.detach = False
        #: the nbdkit left running by a detach (kept referenced, not reaped)
        self.detached: nbdkit.NbdkitProcess | None = None
        self._restart = trio.Event()
        # monotonic time the disk stopped serving; None until first ready
        self._down_since: float | None = None
        self._ready_at: float | None = None
        self._log = structlog.get_logger().bind(disk=disk)

    # -- public -------------------------------------------------------------

    def request_restart(self) -> None:
        """Leave state ``failed`` and try again.  Raises InvalidState otherwise."""
        if self.state is not ProcState.FAILED:
            raise InvalidState(f"disk {self.disk!r} is {self.state.value}, not failed",
                               disk=self.disk)
        self._restart.set()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled.

        Reports started (with nbdkit's pid) once the first incarnation answered
        a real NBD handshake with an export size.  Raises NbdkitFailed, with
        the tail of nbdkit's stderr, if that first start fails: no retries at
        add time, the client gets the reason at once.  On cancellation stops
        nbdkit and removes the socket (see the module docstring for detach).
        """
        try:
            listener = nbdkit.open_listener(self.socket_path,
                                            selinux_label=self.plan.socket_label)
        except OSError as err:
            raise NbdkitFailed(f"cannot listen on {self.socket_path}: {err}",
                               disk=self.disk) from err
        self._listener = listener
        try:
            await self._supervise(listener, task_status)
        finally:
            self._listener = None
            listener.close()
            if not self.detach:
                self.socket_path.unlink(missing_ok=True)
                self.state = ProcState.STOPPED
                self.pid = None

    @asynccontextmanager
    async def standin(self) -> AsyncIterator[None]:
        """Inside the ``async with``: if nbdkit is down, serve an empty export instead.

        QEMU's ``blockdev-del`` of an nbd node whose server is gone blocks
        QMP for the whole reconnect-delay (QEMU 7.2, measured: 30 s).  Its
        pending reconnect sits in our listen backlog, so a stand-in that
        answers lets it complete at once; the device is already gone, so
        no guest I/O reaches the stand-in.  Does nothing while nbdkit runs.
        """
        if (self.state is ProcState.RUNNING or self._listener is None or self.size is None
                or self._standin is None):
            yield
            return
        argv, plan = self._standin
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            proc = await nbdkit.spawn([*argv, f"size={self.size}"], self._listener, devnull,
                                      plan, {})
        finally:
            os.close(devnull)
        self._log.info("nbdkit-standin", pid=proc.pid)
        try:
            with trio.move_on_after(self.config.ready_timeout):
                await nbd.probe_export(self.socket_path)
            yield
        finally:
            with trio.CancelScope(shield=True):
                await self._terminate(proc)
            proc.close()

    # -- internals ----------------------------------------------------------

    def _on_ready(self, pid: int, task_status: trio.TaskStatus[int]) -> None:
        self._ready_at = trio.current_time()
        self.state = ProcState.RUNNING
        if self._down_since is None:
            task_status.started(pid)
            self._log.info("nbdkit-ready", pid=pid, size=self.size)
            return
        downtime_ms = round((self._ready_at - self._down_since) * 1000, 1)
        self._log.info("disk-recovered", pid=pid, restarts=self.restarts,
                       downtime_ms=downtime_ms)
        self._emit("disk-recovered", pid=pid, restarts=self.restarts, downtime_ms=downtime_ms)

    async def _supervise(self, listener: socket.socket,
                         task_status: trio.TaskStatus[int]) -> None:
        failures: deque[float] = deque()
        consecutive = 0
        while True:
            self._ready_at = None
            exit_info = await self._incarnation(
                listener, functools.partial(self._on_ready, task_status=task_status))
            now = trio.current_time()
            ready_at = self._ready_at
            self.pid = None
            self.last_exit = exit_info
            if self._down_since is None and ready_at is None:
                self.state = ProcState.FAILED
                raise NbdkitFailed(
                    f"nbdkit did not start: {exit_info.describe()}"
                    + (f"; stderr: {exit_info.stderr}" if exit_info.stderr else ""),
                    disk=self.disk, stderr=exit_info.stderr or None)
            if ready_at is not None:
                self._down_since = now
            self._log.warning("nbdkit-exited", code=exit_info.code, signal=exit_info.signal,
                              reason=exit_info.reason, stderr=exit_info.stderr or None)
            self._emit("nbdkit-exited", code=exit_info.code, signal=exit_info.signal,
                       reason=exit_info.reason)

            if ready_at is None or now - ready_at < self.policy.min_uptime:
                consecutive += 1
                failures.append(now)
            else:
                consecutive = 0
            while failures and failures[0] < now - self.policy.window:
                failures.popleft()

            if len(failures) >= self.policy.max_failures:
                self.state = ProcState.FAILED
                self.last_error = (f"{len(failures)} failures within {self.policy.window:g}s; "
                                   f"last: {exit_info.describe()}"
                                   + (f"; stderr: {exit_info.stderr}" if exit_info.stderr
                                      else ""))
                self._log.error("disk-failed", reason=self.last_error)
                self._emit("disk-failed", reason=self.last_error)
                await self._restart.wait()
                self._restart = trio.Event()
                failures.clear()
                consecutive = 0
                self._log.info("disk-restart-requested")
            else:
                self.state = ProcState.RESTARTING
                await trio.sleep(self.policy.backoff(consecutive))
            self.state = ProcState.RESTARTING
            self.restarts += 1

    async def _incarnation(self, listener: socket.socket,
                           on_ready: Callable[[int], None]) -> ExitInfo:
        """Run one nbdkit until it exits; returns how it ended."""
        rfd, wfd = os.pipe()
        try:
            proc = await nbdkit.spawn(self.argv, listener, wfd, self.plan, self._secrets)
        except OSError as err:
            os.close(rfd)
            return ExitInfo(None, None, f"cannot execute nbdkit: {err}", "", time.time())
        finally:
            os.close(wfd)
        self.pid = proc.pid
        self._log.debug("nbdkit-spawned", pid=proc.pid, argv=self.argv)
        tail = _Tail()
        reason = ["exited"]
        stderr_done = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._drain_stderr, trio.lowlevel.FdStream(rfd), tail,
                                   stderr_done)
                watch = trio.CancelScope()
                nursery.start_soon(self._watch, proc, watch, reason, on_ready)
                await proc.wait()
                watch.cancel()
                # The tail must hold nbdkit's last words, but a grandchild
                # that kept stderr open must not hold us.
                with trio.move_on_after(1.0):
                    await stderr_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            if proc.returncode is None and self.detach:
                self.detached = proc
            else:
                if proc.returncode is None:
                    with trio.CancelScope(shield=True):
                        await self._terminate(proc)
                proc.close()
        rc = proc.returncode
        if rc is None:  # detached: left running
            return ExitInfo(None, None, "detached", tail.text(), time.time())
        sig = signal.Signals(-rc).name if rc < 0 else None
        return ExitInfo(None if rc < 0 else rc, sig, reason[0], tail.text(), time.time())

    async def _watch(self, proc: nbdkit.NbdkitProcess, scope: trio.CancelScope, reason: list[str],
                     on_ready: Callable[[int], None]) -> None:
        with scope:
            try:
                with trio.fail_after(self.config.ready_timeout):
                    size = await nbd.probe_export(self.socket_path)
            except (OSError, nbd.NbdProtocolError, trio.TooSlowError) as err:
                reason[0] = f"not ready: {err or 'timed out'}"
                proc.kill()
                return
            if self.size is not None and size != self.size:
                # QEMU does not re-read the size on reconnect: serving a
                # different size would corrupt the guest's view of the disk.
                reason[0] = f"export size changed from {self.size} to {size}"
                proc.kill()
                return
            self.size = size
            on_ready(proc.pid)
            if self.config.health_interval <= 0:
                return
            while True:
                await trio.sleep(self.config.health_interval)
                try:
                    with trio.fail_after(self.config.health_timeout):
                        await nbd.probe_alive(self.socket_path)
                except (OSError, nbd.NbdProtocolError, trio.TooSlowError) as err:
                    reason[0] = f"unresponsive: {err or 'health probe timed out'}"
                    self._log.warning("nbdkit-unresponsive", pid=proc.pid, error=reason[0])
                    proc.kill()
                    return

    async def _drain_stderr(self, stream: trio.lowlevel.FdStream, tail: _Tail,
                            done: trio.Event) -> None:
        async with stream:
            pending = b""
            while data := await stream.receive_some(65536):
                tail.add(data)
                pending += data
                *lines, pending = pending.split(b"\n")
                pending = pending[-STDERR_TAIL:]
                for line in lines:
                    self._log.info("nbdkit-stderr", line=line.decode("utf-8", "replace"))
            done.set()

    async def _terminate(self, proc: nbdkit.NbdkitProcess) -> None:
        """SIGTERM, wait up to the grace, SIGKILL, always reap."""
        proc.terminate()
        with trio.move_on_after(self.config.stop_grace):
            await proc.wait()
            return
        self._log.warning("nbdkit-kill", pid=proc.pid, grace=self.config.stop_grace)
        proc.kill()
        with trio.move_on_after(self.config.stop_grace):
            await proc.wait()
            return
        proc.keeper.kill()  # nbdkit is gone; a keeper that hangs is a bug
        await proc.keeper.wait()
