"""Self-check of the test guest: build, boot, hot-plug and unplug disks.

Run ``python -m contrib.guest.selftest [--cache-dir DIR] [--keep]``.  It:

1. builds (or reuses) the guest image and boots it, timing the boot;
2. runs ``uname -r`` and ``cat /proc/partitions`` in the guest;
3. over the test QMP monitor, ``blockdev-add``s a 64 MiB raw file and
   ``device_add``s it as ``virtio-blk-pci`` on root port ``rp1``, waits for
   ``/dev/vda`` (timed), checks its size, writes random data with O_DIRECT
   ``dd``, reads it back (O_DIRECT) and compares sha256 in the guest and with
   the backing file on the host, then ``device_del``s it, waits for
   ``DEVICE_DELETED`` and for ``/dev/vda`` to vanish; a second round re-uses
   ``rp1`` to prove the port is free again;
4. does the same with a 64 MiB qcow2 image as ``scsi-hd`` on ``scsi0.0``
   (guest ``/dev/sda``).

Exit status 0 on success; timings are printed.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import trio

from .build import DEFAULT_CACHE_DIR, ensure_guest
from .qmp import QMPClient, open_qmp
from .vm import GuestVM, open_guest_vm

_T = TypeVar("_T")

DISK_BYTES = 64 * 1024 * 1024
PATTERN_BLOCKS = 256  # 4 KiB blocks = 1 MiB of test data
PATTERN_OFFSET_BLOCKS = 1000


def _say(msg: str) -> None:
    print(msg, flush=True)


async def _timed(label: str, fn: Callable[[], Awaitable[_T]]) -> _T:
    t0 = time.monotonic()
    result = await fn()
    _say(f"  {label}: {time.monotonic() - t0:.3f} s")
    return result


async def _check_io(vm: GuestVM, dev: str, backing_raw: Path | None) -> None:
    """O_DIRECT write + read of a random pattern on ``/dev/<dev>``, compared by sha256."""
    size = int((await vm.check(f"cat /sys/block/{dev}/size")).strip())
    if size * 512 != DISK_BYTES:
        raise AssertionError(f"/dev/{dev}: {size} sectors, expected {DISK_BYTES // 512}")
    _say(f"  /sys/block/{dev}/size = {size} sectors ({size * 512 // 2**20} MiB)")
    await vm.check(f"grep -qw {dev} /proc/partitions")
    n, off = PATTERN_BLOCKS, PATTERN_OFFSET_BLOCKS
    out = await vm.check(
        "set -e\n"
        f"dd if=/dev/urandom of=/tmp/pat bs=4096 count={n} 2>/dev/null\n"
        f"dd if=/tmp/pat of=/dev/{dev} bs=4096 seek={off} count={n} oflag=direct 2>/dev/null\n"
        f"dd if=/dev/{dev} of=/tmp/back bs=4096 skip={off} count={n} iflag=direct 2>/dev/null\n"
        "cmp /tmp/pat /tmp/back\n"
        "sha256sum /tmp/pat /tmp/back\n"
        "rm -f /tmp/pat /tmp/back\n",
        timeout=60,
    )
    sums = [line.split()[0] for line in out.splitlines() if line.strip()]
    if len(sums) != 2 or sums[0] != sums[1]:
        raise AssertionError(f"read-back mismatch on /dev/{dev}:\n{out}")
    _say(f"  O_DIRECT write/read of {n * 4} KiB: sha256 {sums[0][:16]}... matches")
    if backing_raw is not None:
        with backing_raw.open("rb") as f:
            f.seek(off * 4096)
            host_sum = hashlib.sha256(f.read(n * 4096)).hexdigest()
        if host_sum != sums[0]:
            raise AssertionError(f"host backing file differs: {host_sum} != {sums[0]}")
        _say("  host backing file has the same data")


async def _plug_cycle(
    vm: GuestVM,
    qmp: QMPClient,
    *,
    image: Path,
    fmt: str,
    node: str,
    device: dict[str, str],
    dev: str,
) -> None:
    dev_id = device["id"]
    await qmp.execute(
        "blockdev-add",
        {
            "driver": fmt,
            "node-name": node,
            "file": {"driver": "file", "filename": str(image)},
        },
    )
    await qmp.execute("device_add", {**device, "drive": node})
    await _timed(
        f"device_add -> /dev/{dev} visible",
        lambda: vm.wait_for(f"test -b /dev/{dev}", 30),
    )
    await _check_io(vm, dev, image if fmt == "raw" else None)
    await qmp.execute("device_del", {"id": dev_id})
    await _timed(
        "device_del -> DEVICE_DELETED",
        lambda: qmp.wait_event("DEVICE_DELETED", match={"device": dev_id}, timeout=30),
    )
    await _timed(f"/dev/{dev} gone", lambda: vm.wait_for(f"! test -e /dev/{dev}", 30))
    await qmp.execute("blockdev-del", {"node-name": node})


async def selftest(cache_dir: Path, workdir: Path) -> None:
    """Run the whole self-check (see module docstring); raise on failure."""
    t0 = time.monotonic()
    image = await trio.to_thread.run_sync(ensure_guest, cache_dir)
    _say(f"guest image ({time.monotonic() - t0:.2f} s): kernel {image.kernel_release}")
    _say(f"  kernel: {image.kernel}\n  initrd: {image.initrd}")
    for name, fmt in (("vblk.raw", "raw"), ("scsi.qcow2", "qcow2")):
        await trio.run_process(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                fmt,
                str(workdir / name),
                str(DISK_BYTES),
            ]
        )
    async with open_guest_vm(image, workdir / "vm") as vm:
        _say(f"boot ({vm.accel}): {vm.boot_seconds:.2f} s to command server ready, pid {vm.pid}")
        _say(f"uname -r: {(await vm.check('uname -r')).strip()}")
        _say("cat /proc/partitions:\n" + (await vm.check("cat /proc/partitions")).rstrip())
        t = time.monotonic()
        for _ in range(20):
            await vm.check("true")
        _say(f"command round trip: {(time.monotonic() - t) / 20 * 1000:.1f} ms")
        status, out = await vm.run("echo out; echo err >&2; exit 7")
        if (status, out) != (7, "out\nerr\n"):
            raise AssertionError(f"run() returned {(status, out)!r}")

        async with open_qmp(vm.test_qmp_path) as qmp:
            for round_no in (1, 2):
                _say(f"virtio-blk-pci on rp1, round {round_no}:")
                await _plug_cycle(
                    vm, qmp,
                    image=workdir / "vblk.raw", fmt="raw", node="vblk-node",
                    device={"driver": "virtio-blk-pci", "bus": "rp1", "id": "vblk1"},
                    dev="vda",
                )  # fmt: skip
            _say("scsi-hd on scsi0.0:")
            await _plug_cycle(
                vm, qmp,
                image=workdir / "scsi.qcow2", fmt="qcow2", node="scsi-node",
                device={"driver": "scsi-hd", "bus": "scsi0.0", "id": "sd1"},
                dev="sda",
            )  # fmt: skip
        _say("cat /proc/partitions:\n" + (await vm.check("cat /proc/partitions")).rstrip())
        pid = vm.pid
    if vm.process.returncode is None:
        raise AssertionError(f"QEMU {pid} still running after exit")
    _say(f"QEMU {pid} exited with status {vm.process.returncode}")
    _say(f"SELFTEST OK in {time.monotonic() - t0:.1f} s")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m contrib.guest.selftest")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    workdir = Path(tempfile.mkdtemp(prefix="nbdhp-selftest-"))
    try:
        trio.run(selftest, args.cache_dir, workdir)
    except Exception as exc:  # CLI: report any failure and exit 1
        print(f"SELFTEST FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(f"(work directory kept: {workdir})", file=sys.stderr)
        return 1
    if args.keep:
        _say(f"work directory: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
