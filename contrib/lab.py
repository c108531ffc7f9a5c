"""A booted test guest with a real agent attached: the set-up the demo and benchmarks share.

:func:`open_lab` builds (or reuses) the guest of :mod:`contrib.guest`, boots it
under QEMU, starts ``python -m agent serve`` on the guest's QMP socket, and
yields a :class:`Lab`: the VM, the agent process, a subscribed control
connection (events collected in an :class:`EventLog`) and a QMP monitor of
the caller's own.

Shutdown order matters, because an agent stopped by SIGTERM leaves its disks
attached and their nbdkit serving (that is its contract): when the agent
holds no disk it gets SIGTERM (exit 0); otherwise QEMU goes first, and the
agent, seeing QMP close, stops and reaps every nbdkit and exits (3).  Every
process is reaped, also on errors and cancellation.

:func:`become_subreaper` and :func:`reap_orphans` are a last line of defence
for a whole program (the demo): orphans of our children (an nbdkit whose
agent was killed) are re-parented to us, so they can be found and reaped.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from agent.client import ControlClient, open_control
from contrib.guest.build import DEFAULT_CACHE_DIR, ensure_guest
from contrib.guest.qmp import QMPClient, open_qmp
from contrib.guest.vm import GuestVM, open_guest_vm

__all__ = [
    "ROOT",
    "AgentError",
    "EventLog",
    "Lab",
    "become_subreaper",
    "descendants",
    "make_image",
    "open_lab",
    "reap_orphans",
    "sandbox_owner",
]

ROOT = Path(__file__).resolve().parent.parent
_PR_SET_CHILD_SUBREAPER = 36


class AgentError(RuntimeError):
    """The agent did not start, or answered a request with an error."""


class EventLog:
    """Collects the events of a subscribed control connection.

    :meth:`pump` must run in a nursery; :meth:`wait` returns the oldest event
    of a kind not returned before, so an event that came early is not missed.
    """

    def __init__(self, ctl: ControlClient) -> None:
        self.ctl = ctl
        #: every event received so far, in order
        self.events: list[dict[str, Any]] = []
        self._taken: set[int] = set()
        self._changed = trio.Event()

    async def pump(self) -> None:
        """Collect events until the connection closes."""
        async for ev in self.ctl.events():
            self.events.append(ev)
            self._changed.set()
            self._changed = trio.Event()

    @staticmethod
    def matches(ev: dict[str, Any], name: str | Sequence[str], match: dict[str, Any]) -> bool:
        names = (name,) if isinstance(name, str) else tuple(name)
        return ev["event"] in names and all(ev.get(k) == v for k, v in match.items())

    async def wait(self, name: str | Sequence[str], timeout: float = 20,
                   **match: Any) -> dict[str, Any]:
        """The oldest event named ``name`` (or one of several names) with the
        fields ``match``, not returned before.  Raises trio.TooSlowError."""
        with trio.fail_after(timeout):
            while True:
                for i, ev in enumerate(self.events):
                    if i not in self._taken and self.matches(ev, name, match):
                        self._taken.add(i)
                        return ev
                await self._changed.wait()

    def count(self, name: str, **match: Any) -> int:
        """How many events ``name`` with the fields ``match`` came so far."""
        return sum(1 for ev in self.events if self.matches(ev, name, match))

    async def wait_count(self, name: str, count: int, timeout: float = 20,
                         **match: Any) -> None:
        """Wait until :meth:`count` reaches ``count``.  Raises trio.TooSlowError."""
        with trio.fail_after(timeout):
            while self.count(name, **match) < count:
                await self._changed.wait()


@dataclass
class Lab:
    """The guest, the agent and the connections to both."""

    vm: GuestVM
    agent: trio.Process
    ctl: ControlClient
    events: EventLog
    monitor: QMPClient
    workdir: Path
    control: Path
    runtime_dir: Path
    agent_log: Path
    #: the directory the agent's file plugin may serve from (``--file-dir``)
    image_dir: Path

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """A control request; returns its result.  Raises AgentError on an error reply."""
        reply = await self.ctl.call(op, **fields)
        if not reply.get("ok"):
            err = reply.get("error", {})
            raise AgentError(f"{op}: {err.get('code')}: {err.get('message')}")
        result: dict[str, Any] = reply["result"]
        return result

    async def disks(self) -> dict[str, dict[str, Any]]:
        """The agent's ``list``, by disk id."""
        return {d["disk"]: d for d in (await self.call("list"))["disks"]}


async def _wait_agent_ready(proc: trio.Process, control: Path, log: Path,
                            timeout: float) -> None:
    with trio.move_on_after(timeout):
        while proc.poll() is None:
            try:
                async with open_control(control) as ctl:
                    if (await ctl.call("ping")).get("ok"):
                        return
            except (OSError, EOFError):
                pass
            await trio.sleep(0.05)
        raise AgentError(f"the agent exited with status {proc.returncode}:\n{_tail(log)}")
    raise AgentError(f"the agent did not answer within {timeout} s:\n{_tail(log)}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"<{err}>"


async def _stop_agent(proc: trio.Process, control: Path, grace: float) -> None:
    """SIGTERM the agent if it holds no disk (else leave it to QEMU's exit)."""
    if proc.returncode is not None:
        return
    try:
        with trio.fail_after(5):
            async with open_control(control) as ctl:
                reply = await ctl.call("list")
    except (OSError, EOFError, trio.TooSlowError):
        return
    if reply.get("ok") and not reply["result"]["disks"]:
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            await proc.wait()


@asynccontextmanager
async def open_lab(workdir: Path, *, agent_args: Sequence[str] = (),
                   memory_mb: int = 256, cache_dir: Path = DEFAULT_CACHE_DIR,
                   boot_timeout: float = 60) -> AsyncIterator[Lab]:
    """Boot the guest and start an agent on it; yield a :class:`Lab`.

    ``workdir`` must be short (Unix socket paths).  The agent logs JSON lines
    to ``workdir/agent.log``; its file plugin may serve from
    ``workdir/images`` (create images there with :func:`make_image`).  Raises
    AgentError if the agent does not come up, and the errors of
    :mod:`contrib.guest` if the guest does not.
    """
    image = await trio.to_thread.run_sync(ensure_guest, cache_dir)
    control, runtime, log_path = workdir / "ctl.sock", workdir / "run", workdir / "agent.log"
    image_dir = workdir / "images"
    image_dir.mkdir(exist_ok=True)
    # nbdkit runs as an unprivileged user when the agent is root: it must be
    # able to reach the images (the sockets stay in the private runtime dir).
    workdir.chmod(0o711)
    image_dir.chmod(0o711)
    proc: trio.Process | None = None
    try:
        async with open_guest_vm(image, workdir / "vm", memory_mb=memory_mb,
                                 boot_timeout=boot_timeout) as vm:
            argv = [sys.executable, "-m", "agent", "serve", "--qmp", str(vm.qmp_path),
                    "--control", str(control), "--runtime-dir", str(runtime),
                    "--file-dir", str(image_dir), *agent_args]
            with log_path.open("ab") as log:
                # Own session: a Ctrl-C on the terminal must not reach the
                # agent, which would then leave its nbdkits serving.
                proc = await trio.lowlevel.open_process(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=ROOT,
                    env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
            try:
                await _wait_agent_ready(proc, control, log_path, 30)
                async with open_control(control) as ctl, \
                        open_qmp(vm.test_qmp_path) as monitor, trio.open_nursery() as nursery:
                    if not (await ctl.call("subscribe")).get("ok"):
                        raise AgentError("subscribe failed")
                    events = EventLog(ctl)
                    nursery.start_soon(events.pump)
                    yield Lab(vm, proc, ctl, events, monitor, workdir, control, runtime,
                              log_path, image_dir)
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await _stop_agent(proc, control, grace=15)
    finally:
        # QEMU is gone now: an agent still running stops its nbdkits and exits.
        if proc is not None:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(20):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


# --------------------------------------------------------------------------- images


def sandbox_owner() -> tuple[int, int] | None:
    """uid/gid the agent runs nbdkit as when it is root (its default ``run_as``,
    ``nbd-hotplug``, else ``nobody``); None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("nbd-hotplug", "nobody"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        return pw.pw_uid, pw.pw_gid
    return None


def make_image(path: Path, size: int, fill: bytes = b"") -> Path:
    """A disk image of ``size`` bytes starting with ``fill`` (sparse after it),
    readable and writable by the sandboxed nbdkit."""
    with path.open("wb") as f:
        f.write(fill)
        f.truncate(size)
    owner = sandbox_owner()
    if owner is not None:
        os.chown(path, *owner)
    return path


# --------------------------------------------------------------------------- processes


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process (Linux); False if refused."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _ppids() -> dict[int, int]:
    out: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            out[int(entry.name)] = int(fields[1])
    return out


def descendants(pid: int | None = None) -> dict[int, str]:
    """Live processes below ``pid`` (default: this one): pid -> command name."""
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    for child, parent in _ppids().items():
        children.setdefault(parent, []).append(child)
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                found[child] = Path(f"/proc/{child}/comm").read_text().strip()
            except OSError:
                continue
            todo.append(child)
    return found


async def reap_orphans(timeout: float = 5) -> dict[int, str]:
    """SIGKILL every process left below us and reap our direct children among them.

    Returns what was found (pid -> name).  Only meaningful after every child
    this program started on purpose was reaped.
    """
    found = descendants()
    for pid in found:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with trio.move_on_after(timeout):
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG never blocks
            except ChildProcessError:
                break
            if pid == 0:
                await trio.sleep(0.05)
    return found
