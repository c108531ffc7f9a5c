"""The guest's view of the data path: nbdkit (through the agent) vs QEMU's own file driver.

Run ``python -m contrib.bench.guest_io`` from the repository root (see
README.md here).  One run, one booted guest (:mod:`contrib.lab`):

1. One random image, attached twice as ``virtio-blk-pci``: through the agent
   (``add``, file plugin; QEMU's nbd client on the agent's socket) and
   directly by QEMU (``blockdev-add`` raw over ``file``, ``device_add``, on the
   benchmark's own QMP monitor).  Both read the host's page cache.
2. For each round, both disks in turn (the first one alternates), in the
   guest, with O_DIRECT: sequential 1 MiB reads and writes (one ``dd``, MiB/s)
   and random 4 KiB reads and writes at queue depth 1 (one ``dd`` per
   operation).  The latency of every request as the guest kernel saw it comes
   from its block tracepoints (:class:`contrib.guestio.BlockTrace`), so the
   random rows compare the data path without the ~10 ms a ``dd`` fork costs
   under TCG; ops/s (fork included) is shown too.  Per-round results are
   reduced to their median.
3. The stall distribution: the guest reads the agent's disk back to back,
   4 MiB O_DIRECT per ``dd``, each read timed in the guest; the benchmark
   SIGKILLs its nbdkit ``--kills`` times and, per kill, takes the longest
   read overlapping it; the stall is that minus the median read that no kill
   touched.  The agent's ``downtime_ms`` is shown next to it.  Kills come
   faster than the default restart policy allows (an exit less than
   ``min_uptime`` = 1 s after ready counts as a failure and backs off), so the
   agent runs with ``[restart] min_uptime = 0.0``: this measures recovery,
   not the crash-loop policy.

Results go to stdout as tables (``--json FILE`` for the raw samples); exit
status 0, 1 if a step failed, 2 if the guest saw an I/O error.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from contrib.bench.common import (
    Stats,
    fmt_ratio,
    machine_summary,
    percentile,
    render_table,
    write_json,
)
from contrib.guest.vm import GuestVM
from contrib.guestio import (
    NOW_FN,
    BlockTrace,
    GuestLoop,
    LoopRecord,
    block_devices,
    devnum,
    guest_now_ns,
    io_error_lines,
    wait_gone,
    wait_new_block_device,
)
from contrib.lab import Lab, become_subreaper, make_image, open_lab, reap_orphans

MiB = 1 << 20
NATIVE_NODE, NATIVE_DEV = "bench-native", "bench-native-dev"
BACKENDS = ("nbdkit", "qemu-file")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Target:
    """One way the image is attached, as the guest sees it."""

    name: str
    dev: str
    devnum: str


@dataclass
class Sample:
    """One workload on one target in one round."""

    mib_s: float = math.nan
    ops_s: float = math.nan
    latency_us: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------- workloads


async def _timed(vm: GuestVM, body: str, timeout: float) -> tuple[int, int]:
    """Run ``body`` between two guest clock readings; return (start, end) in ns."""
    out = await vm.check(NOW_FN + "now; t0=$NOW\n" + body + "\nnow; echo $t0 $NOW",
                         timeout=timeout)
    t0, t1 = out.split()[-2:]
    return int(t0), int(t1)


async def seq(vm: GuestVM, dev: str, *, write: bool, mib: int) -> float:
    if write:
        body = f"dd if=/tmp/nhsrc of=/dev/{dev} bs=1M count={mib} oflag=direct 2>/dev/null"
    else:
        body = f"dd if=/dev/{dev} of=/dev/null bs=1M count={mib} iflag=direct 2>/dev/null"
    t0, t1 = await _timed(vm, body + " || exit 1", timeout=300)
    return mib / ((t1 - t0) / 1e9)


async def rand(vm: GuestVM, target: Target, trace: BlockTrace, *, write: bool, ops: int,
               blocks: int) -> tuple[float, list[float]]:
    """ops/s (one dd each) and the per-request latencies (µs) of random 4 KiB I/O."""
    io = (f"dd if=/tmp/nhblk of=/dev/{target.dev} bs=4096 count=1 seek=$b oflag=direct"
          if write else
          f"dd if=/dev/{target.dev} of=/dev/null bs=4096 count=1 skip=$b iflag=direct")
    body = (f"i=0; while [ $i -lt {ops} ]; do "
            f"b=$((($RANDOM * 32768 + $RANDOM) % {blocks})); "
            f"{io} 2>/dev/null || exit 1; i=$((i + 1)); done")
    t0, t1 = await _timed(vm, body, timeout=600)
    await trace.poll()
    reqs = trace.for_dev(target.devnum, since=t0, until=t1, ops=("W" if write else "R",))
    return ops / ((t1 - t0) / 1e9), [r.latency_ns / 1000 for r in reqs]


async def compare(lab: Lab, targets: dict[str, Target], trace: BlockTrace,
                  args: argparse.Namespace, blocks: int) -> dict[str, dict[str, list[Sample]]]:
    vm = lab.vm
    await vm.check(f"dd if=/dev/urandom of=/tmp/nhsrc bs=1M count={args.seq_mib} 2>/dev/null; "
                   "dd if=/dev/urandom of=/tmp/nhblk bs=4096 count=1 2>/dev/null", timeout=300)
    workloads = ("seq-read", "seq-write", "rand-read", "rand-write")
    results: dict[str, dict[str, list[Sample]]] = {
        w: {b: [] for b in BACKENDS} for w in workloads}
    for rnd in range(args.rounds):
        order = BACKENDS if rnd % 2 == 0 else BACKENDS[::-1]
        for workload in workloads:
            for name in order:
                target = targets[name]
                sample = Sample()
                if workload.startswith("seq"):
                    sample.mib_s = await seq(vm, target.dev, write=workload == "seq-write",
                                             mib=args.seq_mib)
                else:
                    sample.ops_s, sample.latency_us = await rand(
                        vm, target, trace, write=workload == "rand-write", ops=args.ops,
                        blocks=blocks)
                results[workload][name].append(sample)
                detail = (f"{sample.mib_s:.1f} MiB/s" if workload.startswith("seq") else
                          f"{sample.ops_s:.1f} ops/s, latency p50 "
                          f"{_median(sample.latency_us):.0f} us")
                say(f"  round {rnd + 1}/{args.rounds}  {workload:<10} {name:<9} {detail}")
    return results


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def comparison_table(results: dict[str, dict[str, list[Sample]]]) -> str:
    """Medians over rounds, per backend, with the nbdkit/qemu-file ratio."""
    rows: list[list[str]] = []

    def row(label: str, values: dict[str, float], fmt: str, note: str = "") -> None:
        a, b = (values[n] for n in BACKENDS)
        rows.append([label, format(a, fmt), format(b, fmt), fmt_ratio(a, b) + note])

    for workload in ("seq-read", "seq-write"):
        row(f"{workload} 1 MiB: MiB/s",
            {n: _median([x.mib_s for x in results[workload][n]]) for n in BACKENDS}, ".1f")
    for workload in ("rand-read", "rand-write"):
        per = results[workload]
        for pct in (50, 99):
            row(f"{workload} 4 KiB QD1: latency p{pct} (us)",
                {n: _median([percentile(x.latency_us, pct) for x in per[n]])
                 for n in BACKENDS}, ".0f", "  (lower is better)")
        row(f"{workload} 4 KiB QD1: ops/s (one dd each)",
            {n: _median([x.ops_s for x in per[n]]) for n in BACKENDS}, ".1f")
    return render_table(["workload (median of rounds)", *BACKENDS, "nbdkit/qemu-file"], rows)


# --------------------------------------------------------------------------- stalls


@dataclass
class KillSample:
    downtime_ms: float
    #: guest clock (ns) just before the kill and just after the recovery event
    window: tuple[int, int]
    #: the longest guest read overlapping the window (ms)
    worst_ms: float = math.nan


def _overlaps(rec: LoopRecord, window: tuple[int, int]) -> bool:
    return rec.start < window[1] and rec.end > window[0]


async def stalls(lab: Lab, target: Target, pid: int,
                 args: argparse.Namespace) -> tuple[list[KillSample], list[float]]:
    """Kill nbdkit ``args.kills`` times under timed reads; returns the kills
    and the durations (ms) of the reads that overlapped no kill."""
    vm = lab.vm
    # One timed 4 MiB O_DIRECT read per iteration, back to back: the disk is
    # busy most of the time, so a kill nearly always finds a request in
    # flight; each read is timed in the guest (no trace: at this rate the
    # in-guest trace reader falls behind and the ring buffer overruns).
    loop = GuestLoop(vm, target.dev, kind="time", chunk_size=4 * MiB,
                     chunks=args.image_mib // 4, tag="stall")
    await loop.start()
    samples: list[KillSample] = []
    try:
        await loop.wait_iterations(3)
        for k in range(args.kills):
            g0 = await guest_now_ns(vm)
            os.kill(pid, signal.SIGKILL)
            try:
                ev = await lab.events.wait(("disk-recovered", "disk-failed"), timeout=30,
                                           disk="bench")
            except trio.TooSlowError:
                raise RuntimeError(f"kill {k + 1}: no disk-recovered within 30 s "
                                   f"(nbdkit pid {pid})") from None
            if ev["event"] == "disk-failed":
                raise RuntimeError(f"the agent gave up on the disk: {ev.get('reason')}")
            pid = ev["pid"]
            g1 = await guest_now_ns(vm)
            # A read that starts after g1 starts after the one the kill hit ended.
            await loop.wait_iterations(1, after_ns=g1)
            sample = KillSample(float(ev["downtime_ms"]), (g0, g1))
            hit = [r.duration_ns for r in loop.records if _overlaps(r, sample.window)]
            sample.worst_ms = max(hit) / 1e6 if hit else math.nan
            samples.append(sample)
            say(f"  kill {k + 1}/{args.kills}: downtime {sample.downtime_ms:.1f} ms, "
                f"longest read around it {sample.worst_ms:.1f} ms")
            await trio.sleep(args.spacing)  # pacing between kills, not synchronisation
    finally:
        with trio.CancelScope(shield=True):
            await loop.stop()
    if loop.failures or loop.errors:
        raise RuntimeError(f"guest reads failed: {loop.errors[:3]}")
    calm = [r.duration_ns / 1e6 for r in loop.records
            if not any(_overlaps(r, s.window) for s in samples)]
    return samples, calm


def stall_table(samples: list[KillSample], calm_ms: list[float]) -> str:
    base = percentile(calm_ms, 50)
    rows = []
    for label, values in (
            ("agent downtime_ms", [s.downtime_ms for s in samples]),
            ("guest 4 MiB read, no kill", calm_ms),
            ("guest 4 MiB read hit by a kill", [s.worst_ms for s in samples]),
            ("guest stall (hit - no-kill p50)", [max(0.0, s.worst_ms - base)
                                                 for s in samples])):
        st = Stats.of(values)
        rows.append([label, str(st.n), *(f"{v:.1f}" for v in (st.p50, st.p95, st.p99, st.max))])
    return render_table(["ms", "n", "p50", "p95", "p99", "max"], rows)


# --------------------------------------------------------------------------- main


async def _free_root_port(lab: Lab) -> str:
    mon = lab.monitor
    ports: list[str] = []
    used: set[str] = set()
    for base in ("/machine/peripheral", "/machine/peripheral-anon"):
        for item in await mon.execute("qom-list", {"path": base}):
            if not item["type"].startswith("child<"):
                continue
            path = f"{base}/{item['name']}"
            if item["type"] == "child<pcie-root-port>":
                ports.append(str(item["name"]))
            bus = await mon.execute("qom-get", {"path": path, "property": "parent_bus"})
            used.add(str(bus).rsplit("/", 1)[-1])
    free = sorted(p for p in ports if p not in used)
    if not free:
        raise RuntimeError("no free pcie-root-port for the QEMU-native disk")
    return free[0]


async def bench(args: argparse.Namespace, workdir: Path) -> int:
    config = workdir / "agent.toml"
    config.write_text("[restart]\n# kills come faster than the default policy allows\n"
                      "min_uptime = 0.0\n")
    started = time.monotonic()
    async with open_lab(workdir, agent_args=["--config", str(config)],
                        memory_mb=args.memory) as lab:
        vm = lab.vm
        say(f"guest booted in {vm.boot_seconds:.1f} s ({vm.accel}); agent pid {lab.agent.pid}")
        size = args.image_mib * MiB
        image = make_image(lab.image_dir / "bench.img", size, fill=os.urandom(size))
        before = await block_devices(vm)
        res = await lab.call("add", disk="bench", plugin="file", params={"file": str(image)})
        nbd_dev = await wait_new_block_device(vm, before, timeout=15)
        targets = {"nbdkit": Target("nbdkit", nbd_dev, await devnum(vm, nbd_dev))}
        before = await block_devices(vm)
        await lab.monitor.execute("blockdev-add", {
            "driver": "raw", "node-name": NATIVE_NODE,
            "file": {"driver": "file", "filename": str(image)}})
        await lab.monitor.execute("device_add", {
            "driver": "virtio-blk-pci", "id": NATIVE_DEV, "drive": NATIVE_NODE,
            "bus": await _free_root_port(lab)})
        native_dev = await wait_new_block_device(vm, before, timeout=15)
        targets["qemu-file"] = Target("qemu-file", native_dev, await devnum(vm, native_dev))
        say(f"image {args.image_mib} MiB: nbdkit (agent, pid {res['pid']}) -> /dev/{nbd_dev}, "
            f"QEMU file driver -> /dev/{native_dev}")

        trace = BlockTrace(vm)
        await trace.start()
        results = await compare(lab, targets, trace, args, size // 4096)
        await trace.stop()
        lost = await trace.lost_events()
        if lost:
            raise RuntimeError(f"the guest's trace lost {lost} events: latencies unreliable")
        # The QEMU-native disk goes before the kills (the guest must release it).
        await lab.monitor.execute("device_del", {"id": NATIVE_DEV})
        await lab.monitor.wait_event("DEVICE_DELETED", match={"device": NATIVE_DEV},
                                     timeout=30)
        await wait_gone(vm, native_dev)
        await lab.monitor.execute("blockdev-del", {"node-name": NATIVE_NODE})
        say(f"killing nbdkit {args.kills} times under back-to-back 4 MiB reads")
        samples, calm = await stalls(lab, targets["nbdkit"], res["pid"], args)
        errors = await io_error_lines(vm)
        listed = await lab.disks()
        await lab.call("remove", disk="bench")
        await wait_gone(vm, nbd_dev)

    print(f"guest I/O benchmark ({time.strftime('%Y-%m-%d %H:%M')}, "
          f"{time.monotonic() - started:.0f} s)")
    print(f"machine: {machine_summary()}")
    print(f"guest: 1 vCPU, {args.memory} MiB, {vm.accel}; image {args.image_mib} MiB (random "
          f"data, in the host page cache); virtio-blk-pci both ways; "
          f"{args.rounds} rounds, {args.ops} random ops per round\n")
    print(comparison_table(results))
    print(f"\nstall under {len(samples)} SIGKILLs of nbdkit (agent restarts: "
          f"{listed['bench']['restarts']}); the guest reads 4 MiB at a time, back to back, "
          "one timed dd each:\n")
    print(stall_table(samples, calm))
    print(f"\nguest kernel I/O errors: {len(errors)}")
    for line in errors[:10]:
        print(f"  {line}")
    if args.json:
        write_json(args.json, {
            "args": {k: str(v) for k, v in vars(args).items()},
            "compare": {w: {b: [vars(s) for s in ss] for b, ss in per.items()}
                        for w, per in results.items()},
            "kills": [{"downtime_ms": k.downtime_ms, "worst_read_ms": k.worst_ms}
                      for k in samples],
            "reads_without_kill_ms": calm,
            "io_errors": errors,
        })
    return 2 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m contrib.bench.guest_io",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="default: %(default)s")
    parser.add_argument("--ops", type=int, default=200,
                        help="random 4 KiB operations per round (default: %(default)s)")
    parser.add_argument("--seq-mib", type=int, default=64,
                        help="MiB per sequential run (default: %(default)s)")
    parser.add_argument("--image-mib", type=int, default=128, help="default: %(default)s")
    parser.add_argument("--memory", type=int, default=512, help="guest MiB (%(default)s)")
    parser.add_argument("--kills", type=int, default=50, help="default: %(default)s")
    parser.add_argument("--spacing", type=float, default=0.2,
                        help="seconds between a recovery and the next kill (%(default)s)")
    parser.add_argument("--json", type=Path, help="write the raw samples here")
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir (logs)")
    args = parser.parse_args(argv)
    return trio.run(_main, args)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


async def _main(args: argparse.Namespace) -> int:
    subreaper = become_subreaper()
    workdir = Path(tempfile.mkdtemp(prefix="nhbio-", dir="/tmp"))
    status = 1
    try:
        status = await bench(args, workdir)
    except* (RuntimeError, OSError, TimeoutError, trio.TooSlowError) as group:
        for err in _leaves(group):
            say(f"FAILED: {type(err).__name__}: {err}")
    finally:
        with trio.CancelScope(shield=True):
            left = await reap_orphans() if subreaper else {}
        if left:
            say(f"warning: killed processes left behind: {left}")
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
