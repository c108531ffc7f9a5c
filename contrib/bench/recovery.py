"""Recovery from nbdkit crashes under I/O: the agent against a plain restart.

Issue 3.  One QEMU (q35, TCG, no guest); I/O is HMP ``qemu-io`` through the
test QMP monitor on a ``scsi-hd`` device (real I/O through the device's
BlockBackend), 64 KiB per operation, issued back to back.  Two phases run in
the same invocation, each on its own image file served by nbdkit's file
plugin, with the same ``reconnect-delay`` on the nbd node:

(a) agent: the disk is added through the agent (``add``, file plugin,
    scsi-hd, ``reconnect_delay``).  The agent owns the listening socket and
    hands it to each nbdkit (socket activation); a killed nbdkit is restarted
    at once on the same socket, and QEMU's reconnect waits in its backlog.
(b) plain restart: ``nbdkit -U SOCK --foreground file file=IMG`` without
    activation, ``blockdev-add`` + ``device_add`` over raw QMP; a supervisor
    task in this process does what libvirt does when nbdkit dies: reap it,
    unlink the stale socket, start a new nbdkit on the same path (then
    probe it until it answers an NBD handshake).  QEMU's NBD client
    reconnects by itself, retrying after 1, 2, 4 ... s.

Each kill cycle: write a fresh pattern to a fresh 64 KiB region, read it back
(pattern-checked), SIGKILL nbdkit, then at once read the region again with
the pattern check: that read spans the outage.  The *stall* is the time from
the SIGKILL to the completion of the first read issued after it that did not
fail with an I/O error (a failed one is counted, and the read is reissued).
Then the previous region is read back, and at the end of a phase every
region written is verified.  Errors are the lines ``read failed``, ``write
failed`` and ``Pattern verification failed`` printed by qemu-io.

The agent also reports its own view, ``downtime_ms`` of each
``disk-recovered`` event (nbdkit exit noticed -> the new one answered an NBD
handshake); for the plain restart the same span is measured by the
supervisor task.

Kills come every few tens of milliseconds, faster than the agent's
crash-loop policy allows (an exit within ``min_uptime`` of readiness counts
as a failure; 5 in 60 s and the disk is given up).  The agent runs with a
config file setting ``[restart] min_uptime = 0.0``: this benchmark measures
recovery, not the crash-loop policy.

The plain restart costs about a second per kill (QEMU's reconnect backoff),
so it gets its own, smaller count (``--baseline-kills``).

Run from the repository root::

    python -m contrib.bench.recovery [--kills 200] [--baseline-kills 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

from agent.client import ControlClient, open_control
from contrib.bench.common import (
    BenchError,
    IoResult,
    PlainNbdkit,
    Qemu,
    Stats,
    agent_remove,
    agent_source,
    describe_source,
    fmt_ms,
    fmt_ratio,
    machine_summary,
    progress,
    qmp_detach,
    render_table,
    run_agent,
    run_main,
    run_qemu,
    scratch_dir,
    teardown,
    write_json,
)
from contrib.guest.qmp import QMPClient, open_qmp

IMAGE_SIZE = 64 << 20
BLOCK = 64 << 10
REGIONS = IMAGE_SIZE // BLOCK
SCSI_BUS = "scsi0.0"
#: reads reissued after a kill before the benchmark gives up
MAX_ATTEMPTS = 5
#: deadline for the replacement nbdkit to be ready after a kill
SETTLE_TIMEOUT = 60.0
AGENT_CONFIG = """\
# Written by contrib/bench/recovery.py: kills come faster than the default
# crash-loop policy (min_uptime = 1.0 s) tolerates.  Measures recovery only.
[restart]
min_uptime = 0.0
"""


def pattern(kill: int) -> int:
    """The byte written in kill cycle ``kill``: 1..255, differs on region reuse."""
    return (kill * 7) % 255 + 1


class Target(Protocol):
    """The nbdkit behind the device, as a kill loop sees it."""

    async def kill(self) -> float:
        """SIGKILL the serving nbdkit; returns trio.current_time() of the kill."""

    async def settle(self) -> None:
        """Wait until the replacement nbdkit is serving."""


@dataclass
class Phase:
    """Results of one phase (agent or plain restart)."""

    name: str
    kills: int = 0
    stalls_ms: list[float] = field(default_factory=list)
    read_ms: list[float] = field(default_factory=list)  # pattern-checked reads, no kill
    downtimes_ms: list[float] = field(default_factory=list)
    reissued: int = 0  # kills whose first read after the kill failed
    ops: int = 0
    io_errors: int = 0
    pattern_errors: int = 0
    error_lines: Counter[str] = field(default_factory=Counter)
    verified_regions: int = 0
    seconds: float = 0.0

    def count(self, res: IoResult) -> None:
        self.ops += 1
        self.io_errors += res.io_errors
        self.pattern_errors += res.pattern_errors
        for line in res.errors:
            self.error_lines[line.split(" at offset")[0]] += 1

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kills": self.kills, "stalls_ms": self.stalls_ms,
                "read_ms": self.read_ms, "downtimes_ms": self.downtimes_ms,
                "reissued": self.reissued, "ops": self.ops, "io_errors": self.io_errors,
                "pattern_errors": self.pattern_errors, "error_lines": dict(self.error_lines),
                "verified_regions": self.verified_regions, "seconds": self.seconds}


class IoDriver:
    """Pattern-checked qemu-io operations on one device, counted into a Phase."""

    def __init__(self, qemu: Qemu, monitor: QMPClient, device: str, phase: Phase) -> None:
        self.qemu = qemu
        self.monitor = monitor
        self.device = device
        self.phase = phase

    async def op(self, verb: str, pat: int, region: int) -> IoResult:
        res = await self.qemu.qemu_io(self.monitor, self.device,
                                      f"{verb} -P 0x{pat:02x} {region * BLOCK} {BLOCK}")
        self.phase.count(res)
        return res


async def kill_loop(io: IoDriver, target: Target, kills: int, label: str) -> None:
    """``kills`` kill cycles (see the module docstring), then verify every region."""
    phase = io.phase
    written: dict[int, int] = {}
    start = trio.current_time()
    for k in range(kills):
        region = k % REGIONS
        pat = pattern(k)
        await io.op("write", pat, region)
        t0 = trio.current_time()
        res = await io.op("read", pat, region)
        phase.read_ms.append((res.done_at - t0) * 1000)
        written[region] = pat
        killed_at = await target.kill()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            res = await io.op("read", pat, region)
            if res.io_errors == 0:
                break
            if attempt == 1:
                phase.reissued += 1
        else:
            raise BenchError(f"{label}: kill {k}: no successful read after "
                             f"{MAX_ATTEMPTS} attempts: {res.errors}")
        phase.stalls_ms.append((res.done_at - killed_at) * 1000)
        phase.kills += 1
        await target.settle()
        if k > 0:
            prev = (k - 1) % REGIONS
            await io.op("read", written[prev], prev)
        if (k + 1) % max(1, kills // 10) == 0 or k + 1 == kills:
            progress(f"{label}: {k + 1}/{kills} kills, last stall "
                     f"{phase.stalls_ms[-1]:.1f} ms")
    for region, pat in sorted(written.items()):
        res = await io.op("read", pat, region)
        if res.ok:
            phase.verified_regions += 1
    phase.seconds = trio.current_time() - start


# -- (a) the agent ----------------------------------------------------------------------


class AgentTarget:
    """The agent's disk: kill its nbdkit by pid, learn the next pid from events."""

    def __init__(self, ctl: ControlClient, disk: str, pid: int, phase: Phase) -> None:
        self.ctl = ctl
        self.disk = disk
        self.pid = pid
        self.phase = phase
        self.exit_reasons: Counter[str] = Counter()

    async def kill(self) -> float:
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            raise BenchError(f"agent: nbdkit pid {self.pid} is gone before its kill "
                             f"(restarted behind our back?)") from None
        try:
            now = trio.current_time()
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            os.close(fd)
        return now

    async def settle(self) -> None:
        with trio.fail_after(SETTLE_TIMEOUT):
            while True:
                ev = await self.ctl.next_event()
                if ev.get("disk") != self.disk:
                    continue
                name = ev.get("event")
                if name == "nbdkit-exited":
                    self.exit_reasons[f"{ev.get('reason')} ({ev.get('signal')})"] += 1
                elif name == "disk-failed":
                    raise BenchError(f"agent: disk failed: {ev.get('reason')}")
                elif name == "disk-recovered":
                    self.phase.downtimes_ms.append(float(ev["downtime_ms"]))
                    self.pid = int(ev["pid"])
                    return


async def agent_phase(qemu: Qemu, monitor: QMPClient, workdir: Path,
                      args: argparse.Namespace
                      ) -> tuple[Phase, AgentTarget, list[dict[str, Any]]]:
    phase = Phase("agent")
    images = image_dir(workdir)
    image = images / "agent.img"
    make_image(image)
    config = workdir / "agent.toml"
    extra = args.agent_config.read_text() if args.agent_config else ""
    config.write_text(AGENT_CONFIG + extra)
    disk = "rec"
    async with (run_agent(qemu.qmp_path, workdir, "--config", str(config),
                          *agent_args(args.agent_source, images),
                          source=args.agent_source) as agent,
                open_control(agent.control) as ctl):
        sub = await ctl.call("subscribe")
        if not sub.get("ok"):
            raise BenchError(f"agent subscribe: {sub.get('error')}")
        replied = False  # to the remove
        try:
            reply = await ctl.call("add", disk=disk, plugin="file",
                                   params={"file": str(image)}, driver="scsi-hd",
                                   reconnect_delay=args.reconnect_delay)
            if not reply.get("ok"):
                raise BenchError(f"agent add: {reply.get('error')}")
            result = reply["result"]
            target = AgentTarget(ctl, disk, int(result["pid"]), phase)
            await kill_loop(IoDriver(qemu, monitor, result["device"], phase), target,
                            args.kills, "agent")
            removed = await ctl.call("remove", disk=disk)
            replied = True
        finally:
            if not replied:
                await teardown("agent remove", functools.partial(agent_remove, ctl, disk))
        if not removed.get("ok"):
            raise BenchError(f"agent remove: {removed.get('error')}")
    if agent.leftovers:
        raise BenchError(f"the agent left processes behind: {agent.leftovers}")
    unexpected = [e for e in agent.problems() if e.get("event") != "nbdkit-exited"]
    return phase, target, unexpected


# -- (b) plain nbdkit restart ------------------------------------------------------------


class PlainTarget:
    """nbdkit on ``-U SOCK`` restarted libvirt-style by a task of this process."""

    def __init__(self, socket_path: Path, plugin_args: list[str], phase: Phase,
                 stderr: int) -> None:
        self.socket_path = socket_path
        self.plugin_args = plugin_args
        self.phase = phase
        self.stderr = stderr
        self.nbdkit: PlainNbdkit | None = None
        self.stopping = False
        self.ready = trio.Event()

    async def start(self) -> None:
        self.nbdkit = await PlainNbdkit.start(self.socket_path, self.plugin_args, self.stderr)
        await self.nbdkit.wait_ready()
        self.ready.set()

    async def supervise(self) -> None:
        """Restart nbdkit whenever it dies, until ``stop``."""
        while True:
            assert self.nbdkit is not None
            await self.nbdkit.proc.wait()
            if self.stopping:
                return
            exited = trio.current_time()
            self.socket_path.unlink(missing_ok=True)  # nbdkit leaves it behind
            await self.start()
            self.phase.downtimes_ms.append((trio.current_time() - exited) * 1000)

    async def kill(self) -> float:
        assert self.nbdkit is not None
        self.ready = trio.Event()
        now = trio.current_time()
        self.nbdkit.kill()
        return now

    async def settle(self) -> None:
        with trio.fail_after(SETTLE_TIMEOUT):
            await self.ready.wait()

    async def stop(self) -> None:
        self.stopping = True
        if self.nbdkit is not None:
            await self.nbdkit.stop()


async def plain_phase(qemu: Qemu, monitor: QMPClient, workdir: Path,
                      args: argparse.Namespace) -> Phase:
    phase = Phase("plain restart")
    image = image_dir(workdir) / "plain.img"
    make_image(image)
    with (workdir / "nbdkit-plain.log").open("ab") as log:
        target = PlainTarget(workdir / "plain.sock", ["file", f"file={image}"], phase,
                             log.fileno())
        try:
            async with trio.open_nursery() as nursery:
                await target.start()
                nursery.start_soon(target.supervise)
                try:
                    await plain_attached(qemu, monitor, target, args)
                finally:
                    target.stopping = True
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await target.stop()
    return phase


async def plain_attached(qemu: Qemu, monitor: QMPClient, target: PlainTarget,
                         args: argparse.Namespace) -> None:
    """blockdev-add + device_add, the kill loop, then device_del + blockdev-del."""
    node, dev = "plain-node", "plain-dev"
    attached = True  # in QEMU, maybe partly
    try:
        await monitor.execute("blockdev-add", {
            "driver": "nbd", "node-name": node,
            "server": {"type": "unix", "path": str(target.socket_path)},
            "reconnect-delay": args.reconnect_delay, "read-only": False})
        await monitor.execute("device_add", {"driver": "scsi-hd", "id": dev, "drive": node,
                                             "bus": SCSI_BUS})
        await kill_loop(IoDriver(qemu, monitor, dev, target.phase), target,
                        args.baseline_kills, "plain restart")
        await monitor.execute("device_del", {"id": dev})
        await monitor.wait_event("DEVICE_DELETED", match={"device": dev}, timeout=15)
        await monitor.execute("blockdev-del", {"node-name": node})
        attached = False
    finally:
        if attached:
            await teardown("settle", target.settle)
            await teardown(f"detach {dev}", functools.partial(qmp_detach, monitor, dev, node))


def image_dir(workdir: Path) -> Path:
    """``workdir/images``, reachable and writable by an unprivileged nbdkit.

    The agent may run nbdkit as another user (its sandbox does when the
    agent is root), so the scratch dir gets o+x, this dir o+rx and each
    image mode 0666.  The data is throw-away.
    """
    path = workdir / "images"
    path.mkdir(exist_ok=True)
    workdir.chmod(0o711)
    path.chmod(0o755)
    return path


def make_image(path: Path) -> None:
    """A sparse raw image of IMAGE_SIZE bytes, mode 0666 (see image_dir)."""
    with path.open("wb") as f:
        f.truncate(IMAGE_SIZE)
    path.chmod(0o666)


def agent_args(source: Path, images: Path) -> list[str]:
    """``serve`` options for the file plugin: ``--file-dir`` when the agent has it.

    Since the sandbox (commit ad124f4) the agent serves files only from
    directories named with ``--file-dir``; older trees do not know the option.
    """
    cli = (source / "agent" / "cli.py").read_text()
    return ["--file-dir", str(images)] if '"--file-dir"' in cli else []


# -- report ------------------------------------------------------------------------------


def _row(label: str, st: Stats) -> list[str]:
    return [label, str(st.n), fmt_ms(st.min), fmt_ms(st.p50), fmt_ms(st.p95),
            fmt_ms(st.p99), fmt_ms(st.max), fmt_ms(st.mean)]


def report(agent: Phase, plain: Phase | None, exit_reasons: Counter[str],
           agent_problems: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = (f"Recovery from nbdkit SIGKILL under I/O: {BLOCK >> 10} KiB qemu-io ops on scsi-hd "
            f"(virtio-scsi), nbdkit file plugin, reconnect-delay {args.reconnect_delay} s\n"
            f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; {machine_summary()}\n"
            f"agent: {describe_source(args.agent_source)}\n"
            f"agent: {args.kills} kills (config: [restart] min_uptime = 0.0 - measures "
            f"recovery, not the crash-loop policy)\n"
            f"plain restart: {args.baseline_kills} kills (fewer: ~1 s each, QEMU's "
            f"reconnect backoff)")
    a_stall = Stats.of(agent.stalls_ms)
    rows = [_row("stall: agent (socket activation)", a_stall)]
    if plain is not None:
        p_stall = Stats.of(plain.stalls_ms)
        rows.append(_row("stall: plain nbdkit restart", p_stall))
        rows.append(["stall ratio plain/agent", "",
                     *(fmt_ratio(p, a) for p, a in (
                         (p_stall.min, a_stall.min), (p_stall.p50, a_stall.p50),
                         (p_stall.p95, a_stall.p95), (p_stall.p99, a_stall.p99),
                         (p_stall.max, a_stall.max), (p_stall.mean, a_stall.mean)))])
    rows.append(_row("read, no kill: agent", Stats.of(agent.read_ms)))
    if plain is not None:
        rows.append(_row("read, no kill: plain", Stats.of(plain.read_ms)))
    rows.append(_row("nbdkit downtime: agent (downtime_ms)", Stats.of(agent.downtimes_ms)))
    if plain is not None:
        rows.append(_row("nbdkit downtime: plain (exit->handshake)",
                         Stats.of(plain.downtimes_ms)))
    stall_table = render_table(["ms", "n", "min", "p50", "p95", "p99", "max", "mean"], rows)

    err_rows = []
    for ph in (agent, plain):
        if ph is None:
            continue
        err_rows.append([ph.name, str(ph.kills), str(ph.ops), str(ph.io_errors),
                         str(ph.pattern_errors), str(ph.reissued),
                         f"{ph.verified_regions}/{min(ph.kills, REGIONS)}", f"{ph.seconds:.1f}"])
    err_table = render_table(["errors", "kills", "qemu-io ops", "I/O errors",
                              "pattern errors", "reads reissued", "regions verified",
                              "wall s"], err_rows)
    notes = [f"agent nbdkit exits seen: {dict(exit_reasons)}",
             f"agent warnings/errors other than nbdkit-exited: {len(agent_problems)}"]
    notes += [f"  {entry}" for entry in agent_problems[:10]]
    if plain is not None and plain.stalls_ms:
        quick = sum(x < 500 for x in plain.stalls_ms)
        notes.append(f"plain restart: {quick} of {len(plain.stalls_ms)} stalls under 500 ms "
                     f"(the new nbdkit listened before QEMU's first reconnect attempt)")
    for ph in (agent, plain):
        if ph is not None and ph.error_lines:
            notes.append(f"{ph.name} error lines: {dict(ph.error_lines)}")
    return "\n\n".join([head, stall_table, err_table, "\n".join(notes)])


async def run(args: argparse.Namespace) -> int:
    plain: Phase | None = None
    with scratch_dir("nhr-") as tmp:
        async with run_qemu(tmp) as qemu, open_qmp(qemu.test_qmp_path) as monitor:
            agent, target, problems = await agent_phase(qemu, monitor, tmp, args)
            if args.baseline_kills > 0:
                plain = await plain_phase(qemu, monitor, tmp, args)
    print(report(agent, plain, target.exit_reasons, problems, args))
    if args.json:
        write_json(args.json, {"reconnect_delay": args.reconnect_delay, "block": BLOCK,
                               "agent": agent.to_json(),
                               "plain": plain.to_json() if plain else None})
    failed = agent.io_errors + agent.pattern_errors
    return 0 if failed == 0 else 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m contrib.bench.recovery",
        description="Kill nbdkit under I/O: the agent's recovery against a plain restart.")
    parser.add_argument("--kills", type=int, default=200,
                        help="kills of the agent's nbdkit (default %(default)s)")
    parser.add_argument("--baseline-kills", type=int, default=20,
                        help="kills of the plain nbdkit; 0 skips that phase "
                             "(default %(default)s)")
    parser.add_argument("--reconnect-delay", type=int, default=30,
                        help="reconnect-delay of the nbd node, both phases (default 30)")
    parser.add_argument("--json", type=Path, help="also write the raw samples here")
    parser.add_argument("--agent-source", type=Path,
                        help="run the agent package of this tree (default: this repository)")
    parser.add_argument("--agent-config", type=Path,
                        help="TOML appended to the agent config this benchmark writes "
                             "(which has only [restart] min_uptime = 0.0)")
    args = parser.parse_args(argv)
    if args.kills < 1 or args.baseline_kills < 0:
        parser.error("--kills must be >= 1 and --baseline-kills >= 0")
    if args.reconnect_delay < 1:
        parser.error("--reconnect-delay must be >= 1: with 0 every kill is an I/O error")
    try:
        args.agent_source = agent_source(args.agent_source)
    except BenchError as err:
        parser.error(str(err))
    return run_main("recovery", run, args)


if __name__ == "__main__":
    sys.exit(main())
