"""The nbd-hotplug demo: a guest keeps reading and writing while nbdkit is killed again and again.

Run ``scripts/demo [--kills N]`` (it runs ``scripts/bootstrap`` first) or
``python -m contrib.demo``.  In about a minute it:

1. builds (or reuses, from ``<repo>/.cache/guest``) the tiny busybox guest and
   boots it under QEMU with a QMP socket;
2. starts the agent (``python -m agent serve``) on that socket;
3. serves a 16 MiB random disk image over HTTPS from a local web server
   (:mod:`contrib.demo_https`, byte ranges, a self-signed certificate made on
   the spot with ``openssl``) and hot-adds it, read-only, through nbdkit's curl
   plugin; hot-adds a writable 32 MiB disk backed by a local file;
4. has the guest read the whole remote disk (sha256 against the source image)
   and write and read back data on the writable one (O_DIRECT);
5. keeps two loops running in the guest (random O_DIRECT writes read back and
   verified on the writable disk, random reads of the remote disk checked
   against the source) and kills nbdkit with SIGKILL, mostly the writable
   disk's, every third time the remote disk's, printing for each kill the
   agent's ``downtime_ms`` and the stall the guest saw (the longest block
   request around the kill, from the guest kernel's block tracepoints);
6. prints a summary, removes the disks and stops everything (agent, nbdkit,
   QEMU, web server), checking that no process is left behind.

Exit status: 0 only if the guest saw no I/O error and every checksum
verified; 1 otherwise (or if a step failed); 130 after Ctrl-C or SIGTERM
(everything is cleaned up first).  The agent runs
with its default restart policy, so kills of one disk are spaced more than
its ``min_uptime`` (1 s) apart: each one is an isolated crash, restarted at
once.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from contrib.demo_https import make_self_signed_cert, open_https_server
from contrib.guest.build import DEFAULT_CACHE_DIR, GuestBuildError
from contrib.guest.vm import GuestBootError, GuestChannelError, GuestCommandError
from contrib.guestio import (
    BlockTrace,
    GuestLoop,
    block_bytes,
    block_devices,
    chunk_sha256,
    devnum,
    guest_now_ns,
    io_error_lines,
    wait_gone,
    wait_new_block_device,
    write_read_verify,
)
from contrib.lab import (
    AgentError,
    Lab,
    become_subreaper,
    descendants,
    make_image,
    open_lab,
    reap_orphans,
)

MiB = 1 << 20
REMOTE_SIZE = 16 * MiB
DATA_SIZE = 32 * MiB
CHUNK = 64 * 1024
#: Kill a disk's nbdkit only after it has served this long: more than the
#: agent's default min_uptime (1 s), so that every kill is a one-off crash.
MIN_SERVED = 1.25


class DemoFailed(Exception):
    """A step of the demo failed; the message says which and why."""


@dataclass
class Kill:
    disk: str
    old_pid: int
    new_pid: int
    downtime_ms: float
    #: longest guest block request around the kill (ms); None: the guest did no I/O
    stall_ms: float | None


@dataclass
class Disk:
    name: str
    dev: str = ""
    devnum: str = ""
    pid: int = 0
    ready_at: float = 0.0  # trio time nbdkit last became ready
    loop: GuestLoop | None = None


@dataclass
class Tally:
    kills: list[Kill] = field(default_factory=list)
    verified: int = 0
    checksum_failures: list[str] = field(default_factory=list)
    io_errors: list[str] = field(default_factory=list)


class Demo:
    def __init__(self, args: argparse.Namespace, workdir: Path,
                 say: Callable[[str], None]) -> None:
        self.args = args
        self.workdir = workdir
        self.say = say
        self.started = time.monotonic()
        self.tally = Tally()
        self.disks = {"data": Disk("data"), "remote": Disk("remote")}
        self.remote_sums: list[str] = []
        self.data_image = Path()

    def step(self, text: str) -> None:
        self.say(f"[{time.monotonic() - self.started:5.1f}s] {text}")

    # ------------------------------------------------------------------ main

    async def run(self) -> int:
        self.say("nbd-hotplug demo: hot-plugged nbdkit disks that survive nbdkit crashes")
        self.say(f"work dir {self.workdir}; guest cache {self.args.cache_dir}\n")
        async with open_lab(self.workdir, cache_dir=self.args.cache_dir) as lab:
            vm = lab.vm
            self.step(f"guest booted in {vm.boot_seconds:.1f} s under QEMU ({vm.accel}), "
                      f"pid {vm.pid}, kernel {vm.kernel_release}")
            self.step(f"agent pid {lab.agent.pid} on QMP {vm.qmp_path}, "
                      f"control socket {lab.control}")
            www = self.workdir / "www"
            www.mkdir()
            source = www / "disk.img"
            source.write_bytes(os.urandom(REMOTE_SIZE))
            source_sum = hashlib.sha256(source.read_bytes()).hexdigest()
            self.remote_sums = [chunk_sha256(source, c, CHUNK)
                                for c in range(REMOTE_SIZE // CHUNK)]
            cert, key = await trio.to_thread.run_sync(make_self_signed_cert, self.workdir)
            async with open_https_server(www, cert, key) as web:
                self.step(f"HTTPS server pid {web.process.pid} serving {web.url('disk.img')} "
                          f"({REMOTE_SIZE // MiB} MiB, sha256 {source_sum[:16]}...), "
                          f"self-signed certificate {cert.name}")
                # If a step fails, disks stay attached: then QEMU goes first
                # and the agent stops their nbdkit (see contrib.lab).
                await self._add_disks(lab, web.url("disk.img"), cert)
                await self._first_checks(lab, source_sum)
                await self._kill_loop(lab)
                await self._remove_disks(lab)
            self.step(f"web server stopped ({web.requests} requests, {web.ranged} with a "
                      f"byte range)")
        self.step(f"QEMU stopped; agent exited with status {lab.agent.returncode}")
        return self._summary()

    # ------------------------------------------------------------------ steps

    async def _add_disks(self, lab: Lab, url: str, cert: Path) -> None:
        data_image = make_image(lab.image_dir / "data.img", DATA_SIZE)
        self.data_image = data_image
        plan = (
            ("remote", {"plugin": "curl", "params": {"url": url, "cainfo": str(cert)},
                        "readonly": True}),
            ("data", {"plugin": "file", "params": {"file": str(data_image)}}),
        )
        for name, fields in plan:
            disk = self.disks[name]
            before = await block_devices(lab.vm)
            t0 = trio.current_time()
            res = await lab.call("add", disk=name, **fields)
            disk.dev = await wait_new_block_device(lab.vm, before, timeout=15)
            disk.devnum = await devnum(lab.vm, disk.dev)
            disk.pid, disk.ready_at = res["pid"], trio.current_time()
            size = await block_bytes(lab.vm, disk.dev)
            what = (f"curl {url}, read-only" if name == "remote"
                    else f"file {data_image.name}, writable")
            self.step(f"added '{name}' ({what}): nbdkit pid {res['pid']}, {res['driver']} "
                      f"on {res['bus']} -> guest /dev/{disk.dev}, {size // MiB} MiB, "
                      f"visible after {(trio.current_time() - t0) * 1000:.0f} ms")

    async def _first_checks(self, lab: Lab, source_sum: str) -> None:
        vm, remote, data = lab.vm, self.disks["remote"], self.disks["data"]
        t0 = trio.current_time()
        out = await vm.check(f"dd if=/dev/{remote.dev} bs=1M iflag=direct 2>/dev/null "
                             "| sha256sum", timeout=120)
        secs = trio.current_time() - t0
        got = out.split()[0]
        verdict = "matches the source image" if got == source_sum else "DIFFERS from the source"
        self._count(got == source_sum, "full read of the remote disk")
        self.step(f"guest read all of /dev/{remote.dev} over HTTPS in {secs:.1f} s "
                  f"({REMOTE_SIZE / MiB / secs:.1f} MiB/s): sha256 {got[:16]}... {verdict}")
        written, read = await write_read_verify(vm, data.dev, 4 * MiB, MiB)
        host = chunk_sha256(self.data_image, 4, MiB)
        self._count(written == read == host, "first write on the data disk")
        self.step(f"guest wrote 1 MiB to /dev/{data.dev} and read it back (O_DIRECT): "
                  f"sha256 {written[:16]}... "
                  + ("matches, and the host file holds the same bytes"
                     if written == read == host else "MISMATCH"))

    def _count(self, good: bool, what: str) -> None:
        self.tally.verified += 1
        if not good:
            self.tally.checksum_failures.append(what)

    async def _kill_loop(self, lab: Lab) -> None:
        vm, tally = lab.vm, self.tally
        trace = BlockTrace(vm)
        await trace.start()
        for disk in self.disks.values():
            if disk.name == "data":
                disk.loop = GuestLoop(vm, disk.dev, kind="verify", chunk_size=CHUNK,
                                      chunks=DATA_SIZE // CHUNK, tag=disk.name)
            else:
                disk.loop = GuestLoop(vm, disk.dev, kind="read", chunk_size=CHUNK,
                                      chunks=REMOTE_SIZE // CHUNK, tag=disk.name)
            await disk.loop.start()
        for disk in self.disks.values():
            assert disk.loop is not None
            await disk.loop.wait_iterations(2)
        n = self.args.kills
        self.say(f"\nkilling nbdkit {n} times (SIGKILL) while the guest writes+verifies "
                 f"on /dev/{self.disks['data'].dev} and reads+verifies "
                 f"/dev/{self.disks['remote'].dev}:\n")
        self.say(f"  {'kill':>7}  {'disk':<6}  {'nbdkit pid':<15}  {'downtime':>9}  "
                 f"{'guest stall':>11}  {'verified':>8}  {'bad sums':>8}  {'I/O errors':>10}")
        last_kill = -1e9
        for k in range(1, n + 1):
            disk = self.disks["remote" if k % 3 == 0 else "data"]
            # Pacing, not synchronisation: see MIN_SERVED.
            await trio.sleep_until(max(disk.ready_at + MIN_SERVED,
                                       last_kill + self.args.interval))
            g0 = await guest_now_ns(vm)
            old = disk.pid
            os.kill(old, signal.SIGKILL)
            last_kill = trio.current_time()
            ev = await lab.events.wait(("disk-recovered", "disk-failed"), timeout=30,
                                       disk=disk.name)
            if ev["event"] == "disk-failed":
                raise DemoFailed(f"the agent gave up on '{disk.name}': {ev.get('reason')}")
            disk.pid, disk.ready_at = ev["pid"], trio.current_time()
            g1 = await guest_now_ns(vm)
            assert disk.loop is not None
            # The guest's I/O on that disk goes on: an iteration that began
            # after the recovery completes (the stalled request is done by then).
            await disk.loop.wait_iterations(1, after_ns=g1)
            await self._collect(lab, trace)
            reqs = trace.for_dev(disk.devnum, since=g0, until=g1)
            stall = max(r.latency_ns for r in reqs) / 1e6 if reqs else None
            tally.kills.append(Kill(disk.name, old, disk.pid, float(ev["downtime_ms"]), stall))
            stall_s = f"{stall:8.1f} ms" if stall is not None else "    (idle)"
            pids = f"{old} -> {disk.pid}"
            self.say(f"  {f'{k}/{n}':>7}  {disk.name:<6}  {pids:<15}  "
                     f"{ev['downtime_ms']:6.1f} ms  {stall_s:>11}  {tally.verified:8d}  "
                     f"{len(tally.checksum_failures):8d}  {len(tally.io_errors):10d}")
        for disk in self.disks.values():
            assert disk.loop is not None
            await disk.loop.stop()
        await self._collect(lab, trace)
        await trace.stop()
        data = self.disks["data"]
        assert data.loop is not None
        for chunk, sha in sorted(data.loop.last_written().items()):
            self._count(chunk_sha256(self.data_image, chunk, CHUNK) == sha,
                        f"data.img chunk {chunk} on the host")
        listed = await lab.disks()
        restarts = {name: listed[name]["restarts"] for name in self.disks}
        self.step("loops stopped; every chunk the guest wrote last is in data.img on the host; "
                  f"agent's restart counts: {restarts}")

    async def _collect(self, lab: Lab, trace: BlockTrace) -> None:
        """Fetch the guest's new loop iterations, trace events and kernel errors."""
        tally = self.tally
        for disk in self.disks.values():
            assert disk.loop is not None
            errors_before = len(disk.loop.errors)
            for rec in await disk.loop.poll():
                if rec.status != 0:
                    tally.io_errors.append(f"{disk.name}: iteration {rec.seq}: dd failed "
                                           f"({rec.status})")
                    continue
                good = rec.written == rec.read if rec.written is not None \
                    else rec.read == self.remote_sums[rec.chunk]
                self._count(good, f"{disk.name} chunk {rec.chunk} (iteration {rec.seq})")
            tally.io_errors += [f"{disk.name}: {e}" for e in disk.loop.errors[errors_before:]]
        await trace.poll()
        for line in await io_error_lines(lab.vm):
            if line not in tally.io_errors:
                tally.io_errors.append(line)

    async def _remove_disks(self, lab: Lab) -> None:
        for name, disk in self.disks.items():
            t0 = trio.current_time()
            await lab.call("remove", disk=name)
            await wait_gone(lab.vm, disk.dev, timeout=15)
            self.step(f"removed '{name}': guest released /dev/{disk.dev}, nbdkit stopped "
                      f"({(trio.current_time() - t0) * 1000:.0f} ms)")
        left = list(lab.runtime_dir.iterdir())
        if (await lab.disks()) or left:
            raise DemoFailed(f"the agent still has disks or sockets: {left}")

    # ------------------------------------------------------------------ end

    def _summary(self) -> int:
        t, kills = self.tally, self.tally.kills
        groups = {name: [k for k in kills if k.disk == name] for name in self.disks}
        groups["all"] = kills

        def stat(values: list[float], fn: Callable[[list[float]], float]) -> str:
            return f"{fn(values):.1f}" if values else "-"

        def row(label: str, fn: Callable[[list[Kill]], str]) -> str:
            return f"  {label:<26}" + "".join(f"{fn(ks):>10}" for ks in groups.values())

        def downtimes(ks: list[Kill]) -> list[float]:
            return [k.downtime_ms for k in ks]

        def stalls(ks: list[Kill]) -> list[float]:
            return [k.stall_ms for k in ks if k.stall_ms is not None]

        def p50(values: list[float]) -> float:
            return float(statistics.median(values))

        line = "  " + "-" * (26 + 10 * len(groups))
        self.say("\nsummary")
        self.say(line)
        self.say(f"  {'':<26}" + "".join(f"{name:>10}" for name in groups))
        self.say(row("nbdkit kills (SIGKILL)", lambda ks: str(len(ks))))
        self.say(row("agent downtime p50 (ms)", lambda ks: stat(downtimes(ks), p50)))
        self.say(row("agent downtime max (ms)", lambda ks: stat(downtimes(ks), max)))
        self.say(row("guest stall p50 (ms)", lambda ks: stat(stalls(ks), p50)))
        self.say(row("guest stall max (ms)", lambda ks: stat(stalls(ks), max)))
        self.say(f"  {'guest I/O errors':<26}{len(t.io_errors):>{10 * len(groups)}}")
        self.say(f"  {'checksum failures':<26}{len(t.checksum_failures):>{10 * len(groups)}}"
                 f"   (of {t.verified} verified)")
        self.say(line)
        self.say("  agent downtime: from nbdkit's death to the new nbdkit's first NBD answer\n"
                 "  guest stall: the longest guest block request around the kill (block "
                 "tracepoints);\n  a kill that finds the guest idle on that disk has none")
        for text in (t.io_errors + t.checksum_failures)[:10]:
            self.say(f"  ! {text}")
        ok = not t.io_errors and not t.checksum_failures and len(kills) == self.args.kills
        return 0 if ok else 1


#: What a failed step raises (anything else is a bug and gets a traceback).
_FAILURES = (DemoFailed, AgentError, GuestBootError, GuestBuildError, GuestChannelError,
             GuestCommandError, TimeoutError, trio.TooSlowError, RuntimeError, OSError)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


async def _until_signal(fn: Callable[[], Awaitable[int]],
                        out: Callable[[str], None]) -> int | None:
    """``await fn()``; on SIGINT/SIGTERM cancel it (its clean-up runs) and
    return None."""
    result: list[int] = []
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def main() -> None:
                result.append(await fn())
                nursery.cancel_scope.cancel()

            async def watch() -> None:
                async for signum in signals:
                    out(f"\ninterrupted ({signal.Signals(signum).name}): cleaning up")
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(main)
            nursery.start_soon(watch)
    return result[0] if result else None


async def run_demo(args: argparse.Namespace) -> int:
    def out(text: str) -> None:
        print(text, flush=True)

    subreaper = become_subreaper()
    workdir = Path(tempfile.mkdtemp(prefix="nhdemo-", dir="/tmp"))
    status = 1
    try:
        result = await _until_signal(Demo(args, workdir, out).run, out)
        status = 130 if result is None else result
    except* _FAILURES as group:
        for err in _leaves(group):
            out(f"\nFAILED: {type(err).__name__}: {err}")
        status = 1
    finally:
        with trio.CancelScope(shield=True):
            left = await reap_orphans() if subreaper else descendants()
        if left:
            out(f"processes left behind (killed): {left}")
            status = status or 1
        else:
            out("no process left behind (agent, nbdkit, QEMU, web server all gone)")
        if args.keep:
            out(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    out("PASS" if status == 0 else "FAIL")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/demo", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=30,
                        help="how many times to kill nbdkit (default: %(default)s)")
    parser.add_argument("--interval", type=float, default=1.2,
                        help="least seconds between two kills (default: %(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                        help="guest image cache (default: %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir and its logs")
    args = parser.parse_args(argv)
    if args.kills < 1:
        parser.error("--kills must be at least 1")
    return trio.run(run_demo, args)


if __name__ == "__main__":
    sys.exit(main())
