"""Hot-plug latency: the agent's ``add``/``remove`` beside the same steps done by hand.

Issue 2.  One QEMU (q35, TCG, no guest), one agent on its first QMP monitor;
the benchmark drives the second monitor itself.  Each cycle runs both paths,
in alternating order, on a ``scsi-hd`` disk served by nbdkit's memory plugin
(a virtio-blk unplug never completes without a guest):

* agent: ``add`` request -> reply, then ``remove`` request -> reply, timed on
  the control socket.  The add breakdown comes from the agent's own log lines
  (``nbdkit-ready``, ``disk-added``).
* direct: ``nbdkit -U SOCK --foreground memory size=..`` (no socket
  activation), polled every 2 ms until it answers a full NBD handshake, then
  raw QMP ``blockdev-add`` (nbd, same reconnect-delay) and ``device_add``;
  removal: ``device_del``, wait for ``DEVICE_DELETED``, ``blockdev-del``,
  SIGTERM nbdkit, reap it, unlink its socket.

Between add and remove each disk gets a 4 KiB write and a pattern-checked
read back through HMP ``qemu-io`` (not timed), so every timed add produced a
working disk.  The first ``--warmup`` cycles are not counted.

Run from the repository root::

    python -m contrib.bench.hotplug [--cycles 50] [--warmup 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from agent.client import ControlClient, open_control
from contrib.bench.common import (
    Agent,
    BenchError,
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

MEMORY_SIZE = "64M"
SCSI_BUS = "scsi0.0"


@dataclass
class Series:
    """The timings (ms) of one path, by step name."""

    steps: dict[str, list[float]] = field(default_factory=dict)

    def add(self, step: str, ms: float) -> None:
        self.steps.setdefault(step, []).append(ms)

    def stats(self, step: str) -> Stats:
        return Stats.of(self.steps.get(step, []))


def _ms(start: float, end: float) -> float:
    return (end - start) * 1000.0


def _log_time(entry: dict[str, Any]) -> float:
    """Wall-clock seconds of an agent log entry (ISO-8601 UTC timestamp)."""
    return datetime.datetime.fromisoformat(str(entry["timestamp"])).timestamp()


async def check_disk(qemu: Qemu, monitor: QMPClient, device: str, cycle: int) -> None:
    """A 4 KiB write and a pattern-checked read back.  Raises BenchError."""
    pattern = f"0x{(cycle % 254) + 1:02x}"
    for cmd in (f"write -P {pattern} 0 4096", f"read -P {pattern} 0 4096"):
        res = await qemu.qemu_io(monitor, device, cmd)
        if not res.ok:
            raise BenchError(f"qemu-io {cmd!r} on {device}: {res.errors}")


@dataclass(frozen=True)
class Rig:
    """What every cycle drives: the scratch dir, QEMU, its test monitor, the agent."""

    workdir: Path
    qemu: Qemu
    monitor: QMPClient
    agent: Agent
    ctl: ControlClient
    reconnect_delay: int


async def agent_cycle(rig: Rig, cycle: int, out: Series | None) -> None:
    """add -> reply, check the disk, remove -> reply, through the agent."""
    ctl, agent = rig.ctl, rig.agent
    disk = f"a{cycle}"
    replied = False  # to the remove
    try:
        wall0 = time.time()
        t0 = trio.current_time()
        reply = await ctl.call("add", disk=disk, plugin="memory", params={"size": MEMORY_SIZE},
                               driver="scsi-hd", reconnect_delay=rig.reconnect_delay)
        t1 = trio.current_time()
        wall1 = time.time()
        if not reply.get("ok"):
            raise BenchError(f"agent add {disk}: {reply.get('error')}")
        ready = await agent.wait_log("nbdkit-ready", disk=disk, timeout=10)
        added = await agent.wait_log("disk-added", disk=disk, timeout=10)
        await check_disk(rig.qemu, rig.monitor, reply["result"]["device"], cycle)
        t2 = trio.current_time()
        removed = await ctl.call("remove", disk=disk)
        t3 = trio.current_time()
        replied = True
    finally:
        if not replied:
            await teardown(f"remove {disk}", functools.partial(agent_remove, ctl, disk))
    if not removed.get("ok"):
        raise BenchError(f"agent remove {disk}: {removed.get('error')}")
    if out is not None:
        out.add("add", _ms(t0, t1))
        out.add("remove", _ms(t2, t3))
        out.add("add+remove", _ms(t0, t1) + _ms(t2, t3))
        out.add("request -> nbdkit ready", (_log_time(ready) - wall0) * 1000)
        out.add("nbdkit ready -> attached", (_log_time(added) - _log_time(ready)) * 1000)
        out.add("attached -> reply", (wall1 - _log_time(added)) * 1000)


async def direct_cycle(rig: Rig, cycle: int, out: Series | None) -> None:
    """The same steps by hand: nbdkit -U, blockdev-add, device_add, and back."""
    monitor = rig.monitor
    sock = rig.workdir / f"d{cycle}.sock"
    node, dev = f"d{cycle}-node", f"d{cycle}-dev"
    t0 = trio.current_time()
    nbdkit = await PlainNbdkit.start(sock, ["memory", f"size={MEMORY_SIZE}"])
    attached = False  # in QEMU, maybe partly
    try:
        await nbdkit.wait_ready()
        t_ready = trio.current_time()
        attached = True
        await monitor.execute("blockdev-add", {
            "driver": "nbd", "node-name": node,
            "server": {"type": "unix", "path": str(sock)},
            "reconnect-delay": rig.reconnect_delay, "read-only": False})
        t_node = trio.current_time()
        await monitor.execute("device_add", {"driver": "scsi-hd", "id": dev, "drive": node,
                                             "bus": SCSI_BUS})
        t1 = trio.current_time()
        await check_disk(rig.qemu, monitor, dev, cycle)
        t2 = trio.current_time()
        await monitor.execute("device_del", {"id": dev})
        await monitor.wait_event("DEVICE_DELETED", match={"device": dev}, timeout=15)
        t_unplugged = trio.current_time()
        await monitor.execute("blockdev-del", {"node-name": node})
        attached = False
        t_node_del = trio.current_time()
        await nbdkit.stop()
        t3 = trio.current_time()
    finally:
        if attached:
            await teardown(f"detach {dev}", functools.partial(qmp_detach, monitor, dev, node))
        with trio.CancelScope(shield=True):
            await nbdkit.stop()
    if out is not None:
        out.add("add", _ms(t0, t1))
        out.add("remove", _ms(t2, t3))
        out.add("add+remove", _ms(t0, t1) + _ms(t2, t3))
        out.add("spawn -> nbdkit ready", _ms(t0, t_ready))
        out.add("blockdev-add", _ms(t_ready, t_node))
        out.add("device_add", _ms(t_node, t1))
        out.add("device_del -> DEVICE_DELETED", _ms(t2, t_unplugged))
        out.add("blockdev-del", _ms(t_unplugged, t_node_del))
        out.add("stop nbdkit (TERM, reap, unlink)", _ms(t_node_del, t3))


def _stat_cells(st: Stats) -> list[str]:
    return [fmt_ms(st.min), fmt_ms(st.p50), fmt_ms(st.p95), fmt_ms(st.max), fmt_ms(st.mean)]


def report(agent: Series, direct: Series, args: argparse.Namespace) -> str:
    cols = ["ms", "min", "p50", "p95", "max", "mean"]
    rows: list[list[str]] = []
    for step in ("add", "remove", "add+remove"):
        a, d = agent.stats(step), direct.stats(step)
        rows.append([f"{step}: agent", *_stat_cells(a)])
        rows.append([f"{step}: direct", *_stat_cells(d)])
        rows.append([f"{step}: agent/direct",
                     *(fmt_ratio(x, y) for x, y in ((a.min, d.min), (a.p50, d.p50),
                                                    (a.p95, d.p95), (a.max, d.max),
                                                    (a.mean, d.mean)))])
    main = render_table(cols, rows)
    detail_rows = [[f"agent: {s}", *_stat_cells(agent.stats(s))]
                   for s in ("request -> nbdkit ready", "nbdkit ready -> attached",
                             "attached -> reply")]
    detail_rows += [[f"direct: {s}", *_stat_cells(direct.stats(s))]
                    for s in ("spawn -> nbdkit ready", "blockdev-add", "device_add",
                              "device_del -> DEVICE_DELETED", "blockdev-del",
                              "stop nbdkit (TERM, reap, unlink)")]
    detail = render_table(["breakdown (ms)", "min", "p50", "p95", "max", "mean"], detail_rows)
    head = (f"Hot-plug latency: {args.cycles} cycles per path (+{args.warmup} warm-up, "
            f"not counted), scsi-hd on virtio-scsi, nbdkit memory size={MEMORY_SIZE}, "
            f"reconnect-delay {args.reconnect_delay}\n"
            f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; {machine_summary()}\n"
            f"agent: {describe_source(args.agent_source)}")
    return f"{head}\n\n{main}\n\n{detail}"


async def run(args: argparse.Namespace) -> int:
    agent_series, direct_series = Series(), Series()
    config = ["--config", str(args.agent_config)] if args.agent_config else []
    with scratch_dir("nhb-") as tmp:
        async with (run_qemu(tmp) as qemu,
                    run_agent(qemu.qmp_path, tmp, *config, source=args.agent_source) as agent,
                    open_qmp(qemu.test_qmp_path) as monitor,
                    open_control(agent.control) as ctl):
            rig = Rig(tmp, qemu, monitor, agent, ctl, args.reconnect_delay)
            total = args.warmup + args.cycles
            for cycle in range(total):
                counted = cycle >= args.warmup
                a_out = agent_series if counted else None
                d_out = direct_series if counted else None
                # Alternate which path goes first, so neither always runs
                # right after the other's teardown.
                if cycle % 2 == 0:
                    await agent_cycle(rig, cycle, a_out)
                    await direct_cycle(rig, cycle, d_out)
                else:
                    await direct_cycle(rig, cycle, d_out)
                    await agent_cycle(rig, cycle, a_out)
                if (cycle + 1) % 10 == 0 or cycle + 1 == total:
                    progress(f"hotplug: {cycle + 1}/{total} cycles")
            problems = agent.problems()
    print(report(agent_series, direct_series, args))
    if agent.leftovers:
        print(f"\nthe agent left processes behind (killed): {agent.leftovers}")
    if problems:
        print(f"\nagent warnings/errors during the run: {len(problems)}")
        for entry in problems[:10]:
            print(f"  {entry}")
    if args.json:
        write_json(args.json, {"agent": agent_series.steps, "direct": direct_series.steps,
                               "cycles": args.cycles, "warmup": args.warmup,
                               "reconnect_delay": args.reconnect_delay})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m contrib.bench.hotplug",
        description="Time the agent's add/remove against the same steps done directly.")
    parser.add_argument("--cycles", type=int, default=50,
                        help="counted cycles per path (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="uncounted first cycles (default %(default)s)")
    parser.add_argument("--reconnect-delay", type=int, default=30,
                        help="reconnect-delay of the nbd node, both paths (default 30)")
    parser.add_argument("--json", type=Path, help="also write the raw samples here")
    parser.add_argument("--agent-source", type=Path,
                        help="run the agent package of this tree (default: this repository)")
    parser.add_argument("--agent-config", type=Path, help="config file for the agent")
    args = parser.parse_args(argv)
    if args.cycles < 1 or args.warmup < 0:
        parser.error("--cycles must be >= 1 and --warmup >= 0")
    try:
        args.agent_source = agent_source(args.agent_source)
    except BenchError as err:
        parser.error(str(err))
    return run_main("hotplug", run, args)


if __name__ == "__main__":
    sys.exit(main())
