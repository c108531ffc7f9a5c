"""Guest-side disk I/O for the test guest: find disks, run workloads, time requests.

The guest (:mod:`contrib.guest`) has only busybox, and every fork costs about
10 ms under TCG, so everything here is a small ``/bin/sh`` script sent over
the guest's command channel:

* block devices: :func:`block_devices`, :func:`wait_new_block_device`,
  :func:`block_bytes`, :func:`pci_slot_of`, :func:`io_error_lines`;
* :class:`GuestLoop`: a background loop in the guest that keeps doing O_DIRECT
  I/O on one disk and logs one line per iteration, with sha256 sums of what it
  wrote and read back (``verify``) or of what it read (``read``); the host
  polls the log by byte offset and parses :class:`LoopRecord` s;
* :class:`BlockTrace`: per-request issue/complete time stamps from the
  guest kernel's ``block_rq_issue``/``block_rq_complete`` tracepoints
  (tracefs, ``trace_clock`` mono), i.e. the latency of each request as the
  guest sees it, with microsecond resolution and no fork per request;
* :func:`guest_now_ns`: the guest's CLOCK_MONOTONIC in ns, read from the
  third line of ``/proc/timer_list`` ("now at N nsecs") with shell
  builtins only, the same clock as the trace and the loop time stamps.

Nothing here assumes a test framework: the test, the demo and the benchmark
share it.  Guest commands raise the exceptions of :mod:`contrib.guest.vm`.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import trio

from contrib.guest.vm import GuestVM

__all__ = [
    "IO_ERROR_PATTERN",
    "NOW_FN",
    "BlockRequest",
    "BlockTrace",
    "GuestLoop",
    "LoopRecord",
    "block_bytes",
    "block_devices",
    "chunk_sha256",
    "devnum",
    "guest_now_ns",
    "io_error_lines",
    "pci_slot_of",
    "wait_gone",
    "wait_new_block_device",
    "write_read_verify",
]

#: Shell function setting $NOW to CLOCK_MONOTONIC in ns, without forking.
NOW_FN = "now() { { read -r _t; read -r _t; read -r _t _t NOW _t; } </proc/timer_list; }\n"

_PCI_ADDR = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")

#: Kernel messages that mean the guest saw a failed block request.
IO_ERROR_PATTERN = "I/O error|blk_update_request|Buffer I/O|critical medium error"


async def guest_now_ns(vm: GuestVM) -> int:
    """The guest's CLOCK_MONOTONIC in nanoseconds."""
    return int((await vm.check(NOW_FN + "now; echo $NOW", timeout=10)).strip())


async def block_devices(vm: GuestVM) -> set[str]:
    """Names under /sys/block in the guest."""
    return set((await vm.check("ls /sys/block", timeout=10)).split())


async def wait_new_block_device(vm: GuestVM, before: Iterable[str],
                                timeout: float = 30) -> str:
    """Wait until exactly one block device not in ``before`` exists with a
    non-zero size; return its name.  Raises TimeoutError."""
    known = set(before)
    with trio.move_on_after(timeout):
        while True:
            new = sorted(await block_devices(vm) - known)
            if len(new) > 1:
                raise AssertionError(f"several new block devices: {new}")
            if new and await block_bytes(vm, new[0]) > 0:
                return new[0]
            await trio.sleep(0.05)
    raise TimeoutError(f"no new block device in the guest within {timeout} s")


async def wait_gone(vm: GuestVM, dev: str, timeout: float = 30) -> None:
    """Wait until /sys/block/<dev> and /dev/<dev> are gone.  Raises TimeoutError."""
    await _wait_for(vm, f"! test -e /sys/block/{dev} && ! test -e /dev/{dev}", timeout)


async def block_bytes(vm: GuestVM, dev: str) -> int:
    """Size of /dev/<dev> in bytes (0 if it vanished)."""
    _, out = await vm.run(f"cat /sys/block/{dev}/size 2>/dev/null", timeout=10)
    return int(out.strip() or 0) * 512


async def devnum(vm: GuestVM, dev: str) -> str:
    """``major,minor`` of /dev/<dev>, as the block tracepoints print it."""
    return (await vm.check(f"cat /sys/block/{dev}/dev", timeout=10)).strip().replace(":", ",")


async def pci_slot_of(vm: GuestVM, dev: str) -> str:
    """The /sys/bus/pci/slots/<slot> directory of a virtio disk's PCI device.

    Raises LookupError if the disk sits in no hot-plug slot.
    """
    link = (await vm.check(f"readlink /sys/block/{dev}", timeout=10)).strip()
    addrs = [p for p in link.split("/") if _PCI_ADDR.fullmatch(p)]
    if not addrs:
        raise LookupError(f"/dev/{dev} is not on PCI: {link}")
    slot_addr = addrs[-1].rsplit(".", 1)[0]
    out = await vm.check(
        f"for s in /sys/bus/pci/slots/*; do "
        f'[ "$(cat $s/address)" = {slot_addr} ] && echo $s; done; true', timeout=10)
    slots = out.split()
    if len(slots) != 1:
        raise LookupError(f"/dev/{dev} ({addrs[-1]}): slots {slots}")
    return slots[0]


async def io_error_lines(vm: GuestVM) -> list[str]:
    """Kernel log lines that report a failed block request."""
    out = await vm.check(f"dmesg | grep -E {shlex.quote(IO_ERROR_PATTERN)}; true", timeout=10)
    return [line for line in out.splitlines() if line.strip()]


async def _wait_for(vm: GuestVM, cmd: str, timeout: float) -> None:
    try:
        await vm.wait_for(cmd, timeout=timeout)
    except TimeoutError as err:  # GuestCommandTimeout is one
        raise TimeoutError(str(err)) from err


async def write_read_verify(vm: GuestVM, dev: str, offset: int, length: int,
                            block: int = 4096) -> tuple[str, str]:
    """Write ``length`` random bytes at ``offset`` of /dev/<dev> with O_DIRECT, read
    them back with O_DIRECT; return the sha256 of what was written and of what
    was read.  Raises GuestCommandError if a dd fails."""
    if offset % block or length % block:
        raise ValueError("offset and length must be multiples of the block size")
    n, skip = length // block, offset // block
    out = await vm.check(
        "set -e\n"
        f"dd if=/dev/urandom of=/tmp/nhw bs={block} count={n} 2>/dev/null\n"
        f"dd if=/tmp/nhw of=/dev/{dev} bs={block} seek={skip} count={n} oflag=direct\n"
        f"dd if=/dev/{dev} of=/tmp/nhr bs={block} skip={skip} count={n} iflag=direct\n"
        "sha256sum /tmp/nhw /tmp/nhr >/tmp/nhsums\n"
        "rm -f /tmp/nhw /tmp/nhr\n"
        "cat /tmp/nhsums\n", timeout=60)
    sums = [line.split()[0] for line in out.splitlines() if line.endswith(("/tmp/nhw", "/tmp/nhr"))]
    if len(sums) != 2:
        raise ValueError(f"unexpected output from the guest: {out!r}")
    return sums[0], sums[1]


def chunk_sha256(path: Path, chunk: int, size: int) -> str:
    """sha256 of bytes ``[chunk * size, (chunk + 1) * size)`` of a host file."""
    with path.open("rb") as f:
        f.seek(chunk * size)
        return hashlib.sha256(f.read(size)).hexdigest()


# --------------------------------------------------------------------------- loops


@dataclass(frozen=True)
class LoopRecord:
    """One iteration of a :class:`GuestLoop`.

    ``verify``: random data written to ``chunk`` then read back; ``read``
    and ``time``: ``chunk`` read (``read`` is empty for ``time``).  Times are
    guest CLOCK_MONOTONIC ns: ``start`` before the first I/O, ``end`` after
    the last.  ``written`` is None unless ``verify``.
    """

    kind: str
    seq: int
    chunk: int
    start: int
    end: int
    status: int  # 0, or the failing dd's exit status
    written: str | None
    read: str

    @property
    def duration_ns(self) -> int:
        return self.end - self.start

    @property
    def ok(self) -> bool:
        """No I/O error, and (``verify``) the data read back is what was written."""
        return self.status == 0 and (self.written is None or self.written == self.read)


_VERIFY_BODY = """\
dd if=/dev/urandom of=$w bs=$bs count=1 2>/dev/null
now; t0=$NOW; st=0
dd if=$w of=$dev bs=$bs seek=$c count=1 oflag=direct 2>$e || st=$?
[ $st = 0 ] && { dd if=$dev of=$r bs=$bs skip=$c count=1 iflag=direct 2>$e || st=$?; }
now
[ $st = 0 ] || { sed 1q $e >>$err; : >$r; }
set -- $(sha256sum $w $r)
echo "W $i $c $t0 $NOW $st $1 $3" >>$log
"""

_TIME_BODY = """\
now; t0=$NOW; st=0
dd if=$dev of=/dev/null bs=$bs skip=$c count=1 iflag=direct 2>$e || st=$?
now
[ $st = 0 ] || sed 1q $e >>$err
echo "T $i $c $t0 $NOW $st" >>$log
"""

_READ_BODY = """\
now; t0=$NOW; st=0
dd if=$dev of=$r bs=$bs skip=$c count=1 iflag=direct 2>$e || st=$?
now
[ $st = 0 ] || { sed 1q $e >>$err; : >$r; }
set -- $(sha256sum $r)
echo "R $i $c $t0 $NOW $st $1" >>$log
"""


class GuestLoop:
    """A background I/O loop on one guest disk (see the module docstring).

    ``kind="verify"`` writes ``chunk_size`` random bytes to a random chunk
    with O_DIRECT, reads them back with O_DIRECT and logs both sha256 sums;
    ``kind="read"`` reads a random chunk and logs its sha256; ``kind="time"``
    only reads a random chunk (one ``dd``, no checksum: the cheapest timed
    I/O).  Chunks are drawn from ``range(chunks)``.  The loop runs until
    :meth:`stop`.
    """

    def __init__(self, vm: GuestVM, dev: str, *, kind: Literal["verify", "read", "time"],
                 chunk_size: int = 65536, chunks: int = 64, tag: str | None = None) -> None:
        if chunks > 32768:
            raise ValueError("chunks must be <= 32768 ($RANDOM)")
        self.vm = vm
        self.dev = dev
        self.kind = kind
        self.chunk_size = chunk_size
        self.chunks = chunks
        self.tag = tag or dev
        self.base = f"/tmp/nhloop-{self.tag}"
        self.records: list[LoopRecord] = []
        self.errors: list[str] = []
        self._offset = 0
        self._err_offset = 0
        self._ended = False

    async def start(self) -> None:
        """Start the loop in the guest (returns at once)."""
        b = self.base
        body = {"verify": _VERIFY_BODY, "read": _READ_BODY, "time": _TIME_BODY}[self.kind]
        script = (
            NOW_FN
            + f"dev=/dev/{self.dev} bs={self.chunk_size} w={b}.w r={b}.r e={b}.e "
            f"log={b}.log err={b}.err\n"
            f"rm -f {b}.stop {b}.log {b}.err; : >$log; : >$err\n"
            "i=0\n"
            f"while [ ! -e {b}.stop ]; do\n"
            f"i=$((i + 1)); c=$(($RANDOM % {self.chunks}))\n"
            + body
            + "done\n"
            'echo "END $i" >>$log\n'
        )
        await self.vm.check(
            f"cat >{b}.sh <<'NHEOF'\n{script}NHEOF\n"
            f"sh {b}.sh </dev/null >/dev/null 2>&1 &\n", timeout=10)

    async def poll(self) -> list[LoopRecord]:
        """Fetch and parse the iterations logged since the last poll."""
        out = await self.vm.check(
            f"tail -c +{self._offset + 1} {self.base}.log; echo; "
            f"echo @@ERR; tail -c +{self._err_offset + 1} {self.base}.err", timeout=20)
        # The first "echo" ends a partial last line, if any, just before the marker.
        log_part, _, err_part = out.rpartition("\n@@ERR\n")
        complete = log_part[: log_part.rfind("\n") + 1]
        self._offset += len(complete.encode())
        err_complete = err_part[: err_part.rfind("\n") + 1]
        self._err_offset += len(err_complete.encode())
        self.errors += [x for x in err_complete.splitlines() if x]
        new: list[LoopRecord] = []
        for line in complete.splitlines():
            f = line.split()
            if not f:
                continue
            if f[0] == "END":
                self._ended = True
            elif f[0] == "W" and len(f) == 8:
                new.append(LoopRecord("verify", int(f[1]), int(f[2]), int(f[3]), int(f[4]),
                                      int(f[5]), f[6], f[7]))
            elif f[0] == "R" and len(f) == 7:
                new.append(LoopRecord("read", int(f[1]), int(f[2]), int(f[3]), int(f[4]),
                                      int(f[5]), None, f[6]))
            elif f[0] == "T" and len(f) == 6:
                new.append(LoopRecord("time", int(f[1]), int(f[2]), int(f[3]), int(f[4]),
                                      int(f[5]), None, ""))
            else:
                raise ValueError(f"bad loop log line from {self.tag}: {line!r}")
        self.records += new
        return new

    async def wait_iterations(self, count: int, *, after_ns: int = 0,
                              timeout: float = 30) -> None:
        """Poll until ``count`` more iterations that started after guest time
        ``after_ns`` are logged.  Raises TimeoutError."""
        def done() -> int:
            return sum(1 for r in self.records[mark:] if r.start > after_ns)

        mark = len(self.records)
        with trio.move_on_after(timeout):
            while done() < count:
                if not await self.poll():
                    await trio.sleep(0.05)
            return
        raise TimeoutError(f"guest loop {self.tag}: fewer than {count} iterations "
                           f"within {timeout} s")

    async def stop(self, timeout: float = 30) -> None:
        """Ask the loop to end, wait for its last iteration and collect it."""
        await self.vm.check(f"touch {self.base}.stop", timeout=10)
        with trio.move_on_after(timeout):
            while not self._ended:
                if not await self.poll():
                    await trio.sleep(0.05)
            return
        raise TimeoutError(f"guest loop {self.tag} did not stop within {timeout} s")

    @property
    def failures(self) -> list[LoopRecord]:
        return [r for r in self.records if not r.ok]

    def last_written(self) -> dict[int, str]:
        """chunk -> sha256 of the last data written there (``verify`` loops)."""
        return {r.chunk: r.written for r in self.records if r.written is not None}


# --------------------------------------------------------------------------- trace


@dataclass(frozen=True)
class BlockRequest:
    """One block request as the guest kernel issued and completed it."""

    dev: str  # "major,minor"
    op: str  # rwbs, e.g. "WS", "R"
    sector: int
    sectors: int
    issued: int  # guest CLOCK_MONOTONIC ns
    completed: int
    error: int

    @property
    def latency_ns(self) -> int:
        return self.completed - self.issued


TRACEFS = "/sys/kernel/tracing"

# Pairs block_rq_issue with block_rq_complete (FIFO per device, sector and
# size) in the guest and prints one short line per request: "dev rwbs sector
# sectors issued_us completed_us error".  Shipping the raw trace would cost
# ten times the bytes over the slow serial channel (~0.35 MB/s).  Fields are
# found by shape, not position: the task name may contain spaces.
_PAIR_AWK = r"""
{
    for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+\.[0-9]+:$/) break
    if (i + 3 > NF) next
    ev = $(i + 1)
    if (ev != "block_rq_issue:" && ev != "block_rq_complete:") next
    for (j = i + 4; j < NF; j++) if ($j == "+") break
    if (j >= NF) next
    key = $(i + 2) " " $(j - 1) " " $(j + 1)
    split(substr($i, 1, length($i) - 1), t, ".")
    us = t[1] * 1000000 + t[2]
    if (ev == "block_rq_issue:") {
        tl[key]++
        q[key, tl[key]] = sprintf("%.0f %s", us, $(i + 3))
    } else if (hd[key] < tl[key]) {
        hd[key]++
        split(q[key, hd[key]], a, " ")
        delete q[key, hd[key]]
        err = $(j + 2)
        gsub(/[^0-9-]/, "", err)
        printf "%s %s %s %s %s %.0f %s\n", $(i + 2), a[2], $(j - 1), $(j + 1), a[1], us, err
        fflush()
    }
}
"""


class BlockTrace:
    """Collects :class:`BlockRequest` s from the guest's block tracepoints.

    In the guest, ``cat trace_pipe`` feeds an awk script that pairs issue
    and completion and appends one line per request to a file, which the
    host reads by byte offset: nothing is lost between polls.
    """

    def __init__(self, vm: GuestVM, *, buffer_kb: int = 4096) -> None:
        self.vm = vm
        self.buffer_kb = buffer_kb
        self.requests: list[BlockRequest] = []
        self._offset = 0

    async def start(self) -> None:
        t = TRACEFS
        await self.vm.check(
            f"[ -e {t}/trace_pipe ] || mount -t tracefs nodev {t}\n"
            f"echo 0 >{t}/tracing_on; echo mono >{t}/trace_clock\n"
            f"echo {self.buffer_kb} >{t}/buffer_size_kb; : >{t}/trace\n"
            f"echo 1 >{t}/events/block/block_rq_issue/enable\n"
            f"echo 1 >{t}/events/block/block_rq_complete/enable\n"
            f"cat >/tmp/nhtrace.awk <<'NHEOF'\n{_PAIR_AWK}NHEOF\n"
            ": >/tmp/nhtrace.log; rm -f /tmp/nhtrace.pid\n"
            f"sh -c 'echo $$ >/tmp/nhtrace.pid; exec cat {t}/trace_pipe' </dev/null 2>/dev/null"
            " | awk -f /tmp/nhtrace.awk >>/tmp/nhtrace.log 2>&1 &\n"
            "while [ ! -s /tmp/nhtrace.pid ]; do sleep 0.01; done\n"
            f"echo 1 >{t}/tracing_on\n", timeout=10)

    async def poll(self) -> list[BlockRequest]:
        """Fetch the requests completed since the last poll."""
        out = await self.vm.check(f"tail -c +{self._offset + 1} /tmp/nhtrace.log", timeout=30)
        complete = out[: out.rfind("\n") + 1]
        self._offset += len(complete.encode())
        new: list[BlockRequest] = []
        for line in complete.splitlines():
            f = line.split()
            if len(f) != 7 or not all(x.lstrip("-").isdigit() for x in f[2:]):
                raise ValueError(f"bad trace line from the guest: {line!r}")
            new.append(BlockRequest(f[0], f[1], int(f[2]), int(f[3]), int(f[4]) * 1000,
                                    int(f[5]) * 1000, int(f[6] or 0)))
        self.requests += new
        return new

    async def lost_events(self) -> int:
        """Events the kernel dropped because the reader fell behind (the
        ``overrun`` counters).  Lost events can pair an issue with a later
        completion of the same sectors: latencies are not to be trusted then."""
        out = await self.vm.check(
            f"cat {TRACEFS}/per_cpu/cpu*/stats | grep '^overrun:'", timeout=10)
        return sum(int(line.split()[1]) for line in out.splitlines())

    async def stop(self) -> None:
        """Stop tracing and collect what is left."""
        await self.vm.check(
            f"echo 0 >{TRACEFS}/tracing_on; echo 0 >{TRACEFS}/events/block/enable\n"
            "kill $(cat /tmp/nhtrace.pid) 2>/dev/null; rm -f /tmp/nhtrace.pid; true",
            timeout=10)
        await self.poll()

    def for_dev(self, dev: str, *, since: int = 0, until: int | None = None,
                ops: Sequence[str] = ()) -> list[BlockRequest]:
        """Requests of ``dev`` completed after ``since`` and issued before ``until``
        (guest ns), optionally only those whose rwbs starts with one of ``ops``."""
        return [r for r in self.requests
                if r.dev == dev and r.completed > since
                and (until is None or r.issued < until)
                and (not ops or r.op.startswith(tuple(ops)))]
