"""Shared helpers for ``contrib/bench/hotplug.py`` and ``contrib/bench/recovery.py``.

Everything a benchmark starts is owned by an async context manager that stops
and reaps it on the way out, also on errors and Ctrl-C:

* :func:`scratch_dir`: a short private dir under /tmp (sun_path is 107 bytes),
  removed at the end, after :func:`sweep` killed any process still tied to it
  (the safety net: it reports what it found);
* :func:`run_qemu`: ``qemu-system-x86_64`` as in ``tests/conftest.py`` (q35,
  TCG, no guest, ``-S``, a ``virtio-scsi-pci`` controller ``scsi0``, four
  ``pcie-root-port``, two QMP monitors) under ``stdbuf -oL`` so that the output
  of HMP ``qemu-io`` arrives on its stdout line by line (stderr goes to
  ``qemu.log`` in the scratch dir);
* :func:`run_agent`: ``python -m agent serve`` with its JSON log lines kept;
  on the way out, whatever the agent started and left running is killed;
* :class:`PlainNbdkit`: ``nbdkit -U SOCK --foreground ...`` started directly,
  without socket activation (the baseline of both benchmarks).

:meth:`Qemu.qemu_io` runs one ``qemu-io`` command on a device through the test
QMP monitor (real I/O through the device's BlockBackend) and parses what it
printed.  The stats helpers (:class:`Stats`, :func:`render_table`) format the
results.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from agent import nbd
from agent.client import ControlClient
from contrib.agentproc import AgentProcess, descendants_of, wait_connectable
from contrib.guest.qmp import QMPClient, QMPError

ROOT = Path(__file__).resolve().parents[2]
QEMU = "qemu-system-x86_64"
NBDKIT = "nbdkit"


class BenchError(RuntimeError):
    """A benchmark step failed: the run stops (after cleaning up)."""


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def run_main(name: str, fn: Callable[[argparse.Namespace], Awaitable[int]],
             args: argparse.Namespace) -> int:
    """``trio.run(fn, args)``.

    A BenchError (even inside exception groups) exits 1 with its message,
    Ctrl-C exits 130; anything else is a bug and shows its traceback.
    """
    try:
        return trio.run(fn, args)
    except BaseException as exc:
        leaves = _leaves(exc)
        if any(isinstance(e, KeyboardInterrupt) for e in leaves):
            print(f"{name}: interrupted", file=sys.stderr)
            return 130
        if not leaves or not all(isinstance(e, BenchError) for e in leaves):
            raise
        for leaf in leaves:
            print(f"{name}: {leaf}", file=sys.stderr)
        return 1


# -- scratch space --------------------------------------------------------------------


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A fresh private directory under /tmp, removed with its contents at the end."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        left = sweep(path)
        if left:
            progress(f"warning: killed processes left behind: {left}")
        shutil.rmtree(path, ignore_errors=True)


def progress(text: str) -> None:
    """A progress line on stderr (results go to stdout)."""
    print(text, file=sys.stderr, flush=True)


# -- statistics -----------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """The ``pct``-th percentile (0-100), linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Stats:
    """Summary of a sample of durations (in milliseconds)."""

    n: int
    min: float
    p50: float
    p95: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        if not values:
            nan = math.nan
            return cls(0, nan, nan, nan, nan, nan, nan)
        return cls(len(values), min(values), percentile(values, 50), percentile(values, 95),
                   percentile(values, 99), max(values), sum(values) / len(values))


def fmt_ms(value: float) -> str:
    """A duration in ms for a table cell."""
    if math.isnan(value):
        return "-"
    return f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def fmt_ratio(num: float, den: float) -> str:
    if math.isnan(num) or math.isnan(den) or den <= 0:
        return "-"
    return f"{num / den:.2f}x"


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i])
              for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def machine_summary() -> str:
    """CPU count and model, QEMU and nbdkit versions: for the report header."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for row in Path("/proc/cpuinfo").read_text().splitlines():
            if row.startswith("model name"):
                model = row.split(":", 1)[1].strip()
                break
    versions = []
    for argv in ([QEMU, "--version"], [NBDKIT, "--version"]):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
            versions.append(out.stdout.splitlines()[0].strip() if out.stdout else argv[0])
        except (OSError, subprocess.TimeoutExpired):
            versions.append(f"{argv[0]}: not found")
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs ({model}), TCG, load {load}; {'; '.join(versions)}"


def agent_source(path: Path | None) -> Path:
    """The ``--agent-source`` option: a tree with an ``agent`` package.  Raises BenchError."""
    source = (path or ROOT).resolve()
    if not (source / "agent" / "__main__.py").is_file():
        raise BenchError(f"{source} has no agent/__main__.py")
    return source


def describe_source(source: Path) -> str:
    """The agent tree for the report: path, content hash, git's view when it is ours."""
    digest = hashlib.sha256()
    for path in sorted((source / "agent").rglob("*.py")):
        digest.update(path.relative_to(source).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    tree = f"{source} (agent/*.py sha256 {digest.hexdigest()[:12]})"
    if source != ROOT:
        return tree
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, check=False, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "agent"],
                               capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return tree
    state = "agent/ modified" if dirty.stdout.strip() else "agent/ as committed"
    return f"{tree}, git {out.stdout.strip() or '?'}, {state}"


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


# -- processes ------------------------------------------------------------------------


async def stop_process(proc: trio.Process, grace: float = 10.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; always reaped."""
    with trio.CancelScope(shield=True):
        if proc.returncode is None:
            proc.terminate()
            with trio.move_on_after(grace):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
        await proc.wait()


async def teardown(label: str, fn: Callable[[], Awaitable[object]],
                   timeout: float = 30.0) -> bool:
    """One clean-up step on an error path: shielded, bounded, never raises.

    A failure is reported on stderr (it must not hide the error that got
    us here).  Returns whether the step succeeded.
    """
    ok = False
    with trio.CancelScope(shield=True):
        with trio.move_on_after(timeout) as scope:
            try:
                await fn()
                ok = True
            except Exception as err:
                progress(f"teardown: {label}: {type(err).__name__}: {err}")
        if scope.cancelled_caught:
            progress(f"teardown: {label}: no answer within {timeout:g} s")
    return ok


def descendants(pid: int) -> set[int]:
    """Pids of every live process below ``pid``."""
    return descendants_of({pid})


def kill_and_wait(pids: set[int], timeout: float = 5.0) -> None:
    """SIGKILL processes that are not our children and wait until they are gone."""
    fds: list[int] = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        fds.append(fd)
    deadline = time.monotonic() + timeout
    try:
        for fd in fds:
            select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
    finally:
        for fd in fds:
            os.close(fd)


def _socket_inodes_under(path: Path) -> set[str]:
    """Inodes of Unix sockets bound to a name under ``path`` (unlinked ones too)."""
    prefix = f"{path}/"
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for row in Path("/proc/net/unix").read_text().splitlines()[1:]:
            cols = row.split()
            if len(cols) >= 8 and cols[7].startswith(prefix):
                inodes.add(cols[6])
    return inodes


def sweep(path: Path) -> list[str]:
    """Kill every process that holds a socket bound under ``path``, or names it.

    The safety net behind every benchmark: whatever it started lives in
    its scratch dir (sockets, images), so anything still tied to that dir
    at the end was left behind.  Returns ``"pid cmdline"`` of each one.
    """
    links = {f"socket:[{inode}]" for inode in _socket_inodes_under(path)}
    me = os.getpid()
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace").strip()
        except OSError:
            continue
        hit = f"{path}/" in cmdline
        if not hit and links:
            with contextlib.suppress(OSError):
                for fd in (entry / "fd").iterdir():
                    with contextlib.suppress(OSError):
                        if os.readlink(fd) in links:
                            hit = True
                            break
        if hit:
            found[int(entry.name)] = cmdline[:120]
    kill_and_wait(set(found))
    return [f"{pid} {cmd}" for pid, cmd in sorted(found.items())]


# -- QEMU -----------------------------------------------------------------------------

_REPORT = re.compile(r"^(read|wrote) (\d+)/(\d+) bytes at offset (\d+)$")
_FAILED = re.compile(r"^(read|write) failed: (.*)$")
_PATTERN = "Pattern verification failed"


@dataclass
class IoResult:
    """What one ``qemu-io`` command printed, and when its QMP reply came."""

    command: str
    ok: bool
    lines: list[str]
    errors: list[str] = field(default_factory=list)
    done_at: float = 0.0  # trio.current_time() of the QMP reply

    @property
    def pattern_errors(self) -> int:
        return sum(_PATTERN in e for e in self.errors)

    @property
    def io_errors(self) -> int:
        return len(self.errors) - self.pattern_errors


class Qemu:
    """A running QEMU without guest; its stdout is collected line by line."""

    def __init__(self, proc: trio.Process, workdir: Path) -> None:
        self.proc = proc
        self.qmp_path = workdir / "qmp.sock"
        self.test_qmp_path = workdir / "qmp-test.sock"
        self.lines: list[str] = []
        self._changed = trio.Event()

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        buf = b""
        async for chunk in self.proc.stdout:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            self.lines += [x.decode(errors="replace").rstrip("\r") for x in lines]
            self._changed.set()
            self._changed = trio.Event()

    async def wait_line(self, start: int, done: Callable[[str], bool],
                        timeout: float = 30.0) -> int:
        """Index of the first line at or after ``start`` for which ``done`` holds."""
        with trio.fail_after(timeout):
            while True:
                for i in range(start, len(self.lines)):
                    if done(self.lines[i]):
                        return i
                start = max(start, len(self.lines))
                if self.proc.returncode is not None:
                    raise RuntimeError("QEMU exited")
                await self._changed.wait()

    async def qemu_io(self, monitor: QMPClient, device: str, command: str,
                      timeout: float = 90.0) -> IoResult:
        """Run ``qemu-io -d DEVICE "COMMAND"`` (one read or write) through HMP.

        The command is complete when qemu-io printed its report line
        (``read|wrote N/N bytes at offset OFF``) or ``read|write failed: ...``.
        A pattern mismatch prints ``Pattern verification failed ...`` before
        the report.  Each call waits for its own last line, so no line of one
        command is left to be mistaken for the next one's.
        """
        words = command.split()
        offset = words[-2]
        start = len(self.lines)
        out = await monitor.execute(
            "human-monitor-command",
            {"command-line": f'qemu-io -d {device} "{command}"'}, timeout=timeout)
        done_at = trio.current_time()
        if out:  # the monitor refused it (e.g. no such device)
            return IoResult(command, False, [str(out)], [str(out).strip()], done_at)

        def last(line: str) -> bool:
            m = _REPORT.match(line)
            return bool(m and m.group(4) == offset) or bool(_FAILED.match(line))

        end = await self.wait_line(start, last, timeout=30.0)
        lines = self.lines[start:end + 1]
        errors = [x for x in lines if _FAILED.match(x) or _PATTERN in x]
        return IoResult(command, not errors, lines, errors, done_at)


@asynccontextmanager
async def run_qemu(workdir: Path) -> AsyncIterator[Qemu]:
    """Start QEMU (see the module docstring); SIGTERM and reap it at the end."""
    argv = [
        QEMU, "-machine", "q35", "-accel", "tcg", "-nodefaults",
        "-display", "none", "-m", "128", "-S",
        "-qmp", f"unix:{workdir / 'qmp.sock'},server=on,wait=off",
        "-qmp", f"unix:{workdir / 'qmp-test.sock'},server=on,wait=off",
        "-device", "virtio-scsi-pci,id=scsi0",
    ]
    for i in range(1, 5):
        argv += ["-device", f"pcie-root-port,id=rp{i},chassis={i},slot={i},port={i}"]
    with (workdir / "qemu.log").open("ab") as log:
        # Own session: on Ctrl-C the benchmark tears down in order.
        proc = await trio.lowlevel.open_process(["stdbuf", "-oL", *argv],
                                                stdin=subprocess.DEVNULL,
                                                stdout=subprocess.PIPE, stderr=log,
                                                start_new_session=True)
    qemu = Qemu(proc, workdir)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(qemu._read_stdout)
            try:
                await wait_connectable(qemu.test_qmp_path)
                yield qemu
            finally:
                await stop_process(proc)
                nursery.cancel_scope.cancel()
    finally:
        await stop_process(proc)


# -- the agent ------------------------------------------------------------------------


class Agent(AgentProcess):
    """A running ``python -m agent serve`` and its JSON log lines."""

    def __init__(self, proc: trio.Process, control: Path, runtime_dir: Path) -> None:
        super().__init__(proc, control, runtime_dir)
        #: processes still tied to the runtime dir after the agent exited
        self.leftovers: list[str] = []

    def problems(self) -> list[dict[str, Any]]:
        """Log entries at level warning or above (expected ones included)."""
        return [e for e in self.logs if e.get("level") in ("warning", "error", "critical")]


@asynccontextmanager
async def run_agent(qmp_path: Path, workdir: Path, *extra: str,
                    source: Path = ROOT) -> AsyncIterator[Agent]:
    """Start the agent on ``qmp_path``; stop it at the end (SIGTERM).

    ``source`` is the tree whose ``agent`` package runs (default: this
    repository; e.g. a ``git archive`` of another commit to compare).

    The agent leaves attached disks' nbdkit running when it gets SIGTERM, so
    callers remove their disks first; whatever it started and is still
    alive after it exited is killed here.
    """
    control, runtime = workdir / "ctl.sock", workdir / "run"
    argv = [sys.executable, "-m", "agent", "serve", "--qmp", str(qmp_path),
            "--control", str(control), "--runtime-dir", str(runtime),
            "--log-level", "info", *extra]
    # Its own session: a Ctrl-C in the terminal must reach only the
    # benchmark, which removes the disks first (on SIGINT the agent would
    # leave their nbdkit serving).
    proc = await trio.lowlevel.open_process(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        cwd=source, env={**os.environ, "PYTHONPATH": str(source)}, start_new_session=True)
    agent = Agent(proc, control, runtime)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(agent._read_stderr)
            try:
                yield agent
            finally:
                left = descendants(proc.pid)
                await stop_process(proc, grace=15.0)
                kill_and_wait(left)
                agent.leftovers = sweep(runtime)
                nursery.cancel_scope.cancel()
    finally:
        await stop_process(proc)


async def agent_remove(ctl: ControlClient, disk: str, timeout: float = 60.0) -> None:
    """``remove`` a disk through the agent, for clean-up paths.

    Retried while the agent answers ``busy`` (an ``add`` still in flight);
    ``not-found`` is fine.  Raises BenchError on any other error.
    """
    with trio.fail_after(timeout):
        while True:
            reply = await ctl.call("remove", disk=disk)
            if reply.get("ok"):
                return
            code = reply.get("error", {}).get("code")
            if code == "not-found":
                return
            if code != "busy":
                raise BenchError(f"agent remove {disk}: {reply.get('error')}")
            await trio.sleep(0.05)


async def qmp_detach(monitor: QMPClient, dev: str | None, node: str | None) -> None:
    """Undo ``device_add`` and ``blockdev-add`` on a clean-up path.

    Either may never have happened or be half done: a device that is gone
    already is fine (its DEVICE_DELETED is awaited briefly, as the node
    stays in use until then), and so is a node that does not exist.
    """
    if dev is not None:
        try:
            await monitor.execute("device_del", {"id": dev})
        except QMPError as err:
            if err.error_class != "DeviceNotFound":
                raise
        with contextlib.suppress(TimeoutError):
            await monitor.wait_event("DEVICE_DELETED", match={"device": dev}, timeout=2)
    if node is not None:
        try:
            await monitor.execute("blockdev-del", {"node-name": node})
        except QMPError:
            nodes = await monitor.execute("query-named-block-nodes", {"flat": True})
            if any(n.get("node-name") == node for n in nodes):
                raise


# -- nbdkit without activation ----------------------------------------------------------


class PlainNbdkit:
    """``nbdkit -U SOCK --foreground PLUGIN ARGS...`` started directly (no activation).

    nbdkit does not remove its socket when it is killed (nor, seen with
    1.32.5, when it exits on SIGTERM), and refuses to start on an existing
    path: :meth:`stop` and the caller unlink it.
    """

    def __init__(self, proc: trio.Process, socket_path: Path) -> None:
        self.proc = proc
        self.socket_path = socket_path

    @classmethod
    async def start(cls, socket_path: Path, plugin_args: Sequence[str],
                    stderr: int | None = None) -> PlainNbdkit:
        argv = [NBDKIT, "-U", str(socket_path), "--foreground", *plugin_args]
        proc = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=stderr if stderr is not None else subprocess.DEVNULL,
            start_new_session=True)
        return cls(proc, socket_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def wait_ready(self, timeout: float = 10.0, poll: float = 0.002) -> int:
        """Poll every ``poll`` s until the socket answers a full NBD handshake.

        Returns the export size.  Raises RuntimeError if nbdkit exits first,
        trio.TooSlowError after ``timeout``.
        """
        with trio.fail_after(timeout):
            while True:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"nbdkit exited with {self.proc.returncode}")
                try:
                    return await nbd.probe_export(self.socket_path)
                except (OSError, nbd.NbdProtocolError):
                    await trio.sleep(poll)

    def kill(self) -> None:
        """SIGKILL (no-op once reaped)."""
        if self.proc.returncode is None:
            self.proc.kill()

    async def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, reap (SIGKILL after ``grace``), remove the socket."""
        await stop_process(self.proc, grace)
        self.socket_path.unlink(missing_ok=True)
