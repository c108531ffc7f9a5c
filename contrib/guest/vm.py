"""Boot the test guest under QEMU and talk to it (trio-async).

:func:`open_guest_vm` starts ``qemu-system-x86_64 -machine q35`` with:

* ``workdir/qmp.sock``: QMP monitor for the agent under test (QEMU listens);
* ``workdir/qmp-test.sock``: a second QMP monitor for the test itself
  (see :mod:`contrib.guest.qmp`); each QMP socket serves one client at a time;
* ``virtio-scsi-pci`` controller ``scsi0`` (bus ``scsi0.0``) and four empty
  ``pcie-root-port`` devices ``rp1``..``rp4`` to hot-plug ``virtio-blk-pci``
  into (q35 in QEMU 7.2 uses ACPI PCI hotplug for them, which the guest's
  built-in ``acpiphp`` handles; ``pciehp`` is built in too);
* the kernel console (ttyS0) logged to ``workdir/console.log`` and QEMU's own
  stderr to ``workdir/qemu.log``;
* the command channel: the guest's second UART (ttyS1) wired to
  ``workdir/cmd.sock``.  *We* listen on that socket and QEMU connects to it
  as a client at startup, so nothing the guest prints can be lost before we
  are attached.  The guest side (see :mod:`contrib.guest.build`) switches the
  tty to raw mode (8-bit clean, no echo) and frames every reply with markers
  that carry a fresh random id, so :meth:`GuestVM.run` returns the exact
  output and exit status (protocol: ``CMDSERVER_SCRIPT`` in ``build``).

Accelerator: KVM is used only if :func:`kvm_usable` says so, otherwise TCG.
``/dev/kvm`` exists on some hosts where it cannot run a stock kernel (the PVM
hypervisor, ``/sys/module/kvm_pvm``), so its mere presence proves nothing.
Set ``NBDHP_GUEST_ACCEL=tcg`` or ``=kvm`` to override the detection.

On exit QEMU gets SIGTERM (a clean QEMU shutdown), then SIGKILL after a grace
period, and is always reaped, also on errors and cancellation.
"""

from __future__ import annotations

import fcntl
import math
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import trio

from .build import MARK_BEGIN, MARK_END, MARK_READY, GuestImage

__all__ = [
    "GuestBootError",
    "GuestChannelError",
    "GuestCommandError",
    "GuestCommandTimeout",
    "GuestVM",
    "kvm_usable",
    "open_guest_vm",
    "qemu_command",
]

_T = TypeVar("_T")

QEMU = "qemu-system-x86_64"
#: Kernel command line; ``quiet`` saves ~0.3 s of TCG boot time (pass
#: ``kernel_args=["loglevel=7"]`` to get the full log in console.log).
KERNEL_APPEND = "console=ttyS0 panic=-1 8250.nr_uarts=2 quiet"
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_KVM_GET_API_VERSION = 0xAE00
_KVM_API_VERSION = 12


class GuestBootError(RuntimeError):
    """QEMU failed to start or the guest did not become ready in time."""


class GuestChannelError(RuntimeError):
    """The command channel broke (usually: QEMU exited)."""


class GuestCommandTimeout(TimeoutError):
    """A guest command did not finish in time."""


class GuestCommandError(RuntimeError):
    """:meth:`GuestVM.check`: the command exited with a non-zero status."""

    def __init__(self, cmd: str, status: int, output: str) -> None:
        self.cmd = cmd
        self.status = status
        self.output = output
        super().__init__(f"guest command failed with status {status}: {cmd!r}\n{output}")


def kvm_usable() -> bool:
    """Whether KVM can run our stock Debian kernel on this host.

    All of these must hold:

    * ``/sys/module/kvm_pvm`` is absent: the PVM hypervisor exposes a working
      ``/dev/kvm`` but can only run PVM-enabled guest kernels;
    * the CPU advertises hardware virtualisation (``vmx`` or ``svm`` in
      ``/proc/cpuinfo``);
    * ``/dev/kvm`` opens read-write and ``KVM_GET_API_VERSION`` returns 12.
    """
    if Path("/sys/module/kvm_pvm").exists():
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    if " vmx" not in flags and " svm" not in flags:
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, _KVM_GET_API_VERSION) == _KVM_API_VERSION
    except OSError:
        return False
    finally:
        os.close(fd)


def _choose_accel(accel: str | None) -> str:
    accel = accel or os.environ.get("NBDHP_GUEST_ACCEL") or None
    if accel is None:
        return "kvm" if kvm_usable() else "tcg"
    if accel not in ("kvm", "tcg"):
        raise ValueError(f"accel must be 'kvm' or 'tcg', not {accel!r}")
    return accel


def _opt(path: Path) -> str:
    """Quote a value for a QEMU ``key=value,...`` option (commas are doubled)."""
    return str(path).replace(",", ",,")


def qemu_command(
    image: GuestImage,
    workdir: Path,
    *,
    accel: str,
    memory_mb: int = 256,
    extra_args: Sequence[str] = (),
    kernel_args: Sequence[str] = (),
) -> list[str]:
    """The QEMU command line used by :func:`open_guest_vm` (exposed for debugging)."""
    cmd = [
        QEMU,
        "-name", "nbdhp-guest",
        "-machine", "q35",
        "-accel", accel,
        *(["-cpu", "host"] if accel == "kvm" else []),
        "-smp", "1",
        "-m", str(memory_mb),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", " ".join([KERNEL_APPEND, *kernel_args]),
        "-chardev", f"file,id=console0,path={_opt(workdir / 'console.log')}",
        "-serial", "chardev:console0",
        "-chardev", f"socket,id=cmd0,path={_opt(workdir / 'cmd.sock')}",
        "-serial", "chardev:cmd0",
    ]  # fmt: skip
    for name, sock in (("qmp0", "qmp.sock"), ("qmptest0", "qmp-test.sock")):
        cmd += [
            "-chardev", f"socket,id={name},path={_opt(workdir / sock)},server=on,wait=off",
            "-mon", f"chardev={name},mode=control",
        ]  # fmt: skip
    cmd += ["-device", "virtio-scsi-pci,id=scsi0,bus=pcie.0"]
    for i in range(1, 5):
        # Unique (chassis, slot) per port, as PCIe hotplug requires.
        cmd += [
            "-device",
            f"pcie-root-port,id=rp{i},bus=pcie.0,chassis={i},slot={i},port={i}",
        ]
    cmd += list(extra_args)
    return cmd


class GuestVM:
    """A running guest; obtained from :func:`open_guest_vm`."""

    def __init__(
        self,
        *,
        workdir: Path,
        process: trio.Process,
        stream: trio.SocketStream,
        accel: str,
    ) -> None:
        self.workdir = workdir
        #: QMP socket for the agent under test.
        self.qmp_path = workdir / "qmp.sock"
        #: QMP socket for the test's own inspection.
        self.test_qmp_path = workdir / "qmp-test.sock"
        self.console_log = workdir / "console.log"
        self.qemu_log = workdir / "qemu.log"
        self.process = process
        self.pid: int = process.pid
        self.accel = accel
        #: Seconds from QEMU start until the guest's command server answered.
        self.boot_seconds: float = 0.0
        #: ``uname -r`` reported by the guest.
        self.kernel_release: str = ""
        self._stream = stream
        self._buf = bytearray()
        self._lock = trio.Lock()
        self._seq = 0
        self._broken: str | None = None

    # ------------------------------------------------------------ channel
    async def _receive(self) -> None:
        try:
            data = await self._stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            data = b""
            self._broken = str(exc)
        if not data:
            self._broken = self._broken or "EOF"
            raise GuestChannelError(
                f"guest command channel closed ({self._broken}); "
                f"QEMU exit status {self.process.poll()}\n{self.log_tail()}"
            )
        self._buf += data

    async def _read_until(self, marker: bytes, *, keep: bool = True) -> bytes:
        """Consume the channel up to and including ``marker``; return what preceded it.

        With ``keep=False`` the preceding bytes are dropped as they come (the
        buffer stays small while skipping stale output).
        """
        start = 0
        while True:
            pos = self._buf.find(marker, start)
            if pos >= 0:
                data = bytes(self._buf[:pos]) if keep else b""
                del self._buf[: pos + len(marker)]
                return data
            if keep:
                start = max(0, len(self._buf) - len(marker) + 1)
            else:
                del self._buf[: max(0, len(self._buf) - len(marker) + 1)]
            await self._receive()

    async def _wait_ready(self) -> None:
        await self._read_until(f"\n{MARK_READY} ".encode(), keep=False)
        self.kernel_release = (await self._read_until(b"\n")).decode(errors="replace").strip()

    async def run(
        self,
        cmd: str,
        timeout: float = 30,
    ) -> tuple[int, str]:
        """Run ``cmd`` with ``/bin/sh`` in the guest; return ``(exit status, stdout+stderr)``.

        The output is exact (decoded as UTF-8 with replacement).  Raises
        :class:`GuestCommandTimeout` if no answer comes within ``timeout``
        seconds (the guest kills the command a second later, so the channel
        stays usable) and :class:`GuestChannelError` if the channel is gone.
        """
        status, output = await self.run_bytes(cmd, timeout)
        return status, output.decode("utf-8", "replace")

    async def run_bytes(
        self,
        cmd: str,
        timeout: float = 30,
    ) -> tuple[int, bytes]:
        """:meth:`run` returning the raw output bytes."""
        if self._broken is not None:
            raise GuestChannelError(f"guest command channel closed ({self._broken})")
        async with self._lock:
            self._seq += 1
            req_id = f"{self._seq}-{secrets.token_hex(8)}"
            guest_timeout = math.ceil(min(timeout, 1e6)) + 1
            script = _encode_script(cmd) or ":"  # an empty token would shift the fields
            request = f"{req_id} {script} {guest_timeout}\n".encode()
            with trio.move_on_after(timeout):
                # A half-sent request would garble the next one: never cancel mid-send.
                with trio.CancelScope(shield=True):
                    await self._stream.send_all(request)
                # Anything before our BEGIN is stale (late replies of timed-out
                # commands, a restarted server's READY line) and is skipped.
                await self._read_until(f"\n{MARK_BEGIN} {req_id}\n".encode(), keep=False)
                output = await self._read_until(f"\n{MARK_END} {req_id} ".encode())
                status = await self._read_until(b"\n")
                return int(status.strip() or b"255"), output
        raise GuestCommandTimeout(f"guest command timed out after {timeout} s: {cmd!r}")

    async def check(
        self,
        cmd: str,
        timeout: float = 30,
    ) -> str:
        """Like :meth:`run` but return only the output; raise :class:`GuestCommandError`
        unless the status is 0."""
        status, output = await self.run(cmd, timeout)
        if status != 0:
            raise GuestCommandError(cmd, status, output)
        return output

    async def wait_for(
        self,
        cmd: str,
        timeout: float = 30,
        interval: float = 0.05,
    ) -> str:
        """Re-run ``cmd`` until it exits 0 (return its output) or ``timeout`` passes."""
        deadline = trio.current_time() + timeout
        status, output = -1, ""
        while True:
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                break
            try:
                status, output = await self.run(cmd, timeout=remaining)
            except GuestCommandTimeout:
                break
            if status == 0:
                return output
            await trio.sleep(min(interval, max(0.0, deadline - trio.current_time())))
        raise GuestCommandTimeout(
            f"guest command did not succeed within {timeout} s: {cmd!r}"
            f" (last status {status}, output {output!r})"
        )

    # ------------------------------------------------------------ logs
    def console_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the guest console log."""
        return _tail(self.console_log, lines)

    def log_tail(self, lines: int = 40) -> str:
        """Console and QEMU stderr tails, for error messages."""
        return (
            f"--- {self.console_log} (tail) ---\n{_tail(self.console_log, lines)}\n"
            f"--- {self.qemu_log} (tail) ---\n{_tail(self.qemu_log, lines)}"
        )


_SAFE_BYTES = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_./=:,+@%^-"
)


def _encode_script(cmd: str) -> str:
    """Encode ``cmd`` as one space-free token for the guest's ``printf %b``."""
    return "".join(chr(b) if b in _SAFE_BYTES else f"\\0{b:03o}" for b in cmd.encode())


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"<{exc}>"
    return "\n".join(text.splitlines()[-lines:])


async def _terminate(process: trio.Process, grace: float) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; always reap. Not cancellable."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(grace):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _unless_exited(process: trio.Process, fn: Callable[[], Awaitable[_T]]) -> _T:
    """Await ``fn()``; raise :class:`GuestBootError` if QEMU exits first."""
    result: list[_T] = []
    errors: list[Exception] = []
    async with trio.open_nursery() as nursery:

        async def main() -> None:
            try:
                result.append(await fn())
            except Exception as exc:  # re-raised below, outside the nursery
                errors.append(exc)
            nursery.cancel_scope.cancel()

        async def watch() -> None:
            await process.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(main)
        nursery.start_soon(watch)
    if errors:
        raise errors[0]
    if not result:
        raise GuestBootError(f"QEMU exited with status {process.returncode} during boot")
    return result[0]


def _prepare_workdir(workdir: Path) -> Path:
    """Absolute ``workdir``, created, with stale sockets removed and path lengths checked."""
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("cmd.sock", "qmp.sock", "qmp-test.sock"):
        path = workdir / name
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            raise GuestBootError(f"unix socket path too long (max {_SUN_PATH_MAX} bytes): {path}")
        path.unlink(missing_ok=True)
    return workdir


@asynccontextmanager
async def open_guest_vm(
    image: GuestImage,
    workdir: Path,
    *,
    extra_args: Sequence[str] = (),
    memory_mb: int = 256,
    boot_timeout: float = 60,
    accel: str | None = None,
    kernel_args: Sequence[str] = (),
    shutdown_grace: float = 5,
) -> AsyncIterator[GuestVM]:
    """Boot the guest, wait until its command server answers, yield a :class:`GuestVM`.

    ``workdir`` (created if needed) receives the sockets and logs; keep its path
    short, unix socket paths are limited to 107 bytes.  ``accel`` is ``"kvm"``,
    ``"tcg"`` or ``None`` for auto-detection (see :func:`kvm_usable`).
    ``extra_args`` are appended to the QEMU command line, ``kernel_args`` to
    the kernel's.  ``boot_timeout`` bounds the wait for the command server;
    on expiry :class:`GuestBootError` carries the console and QEMU log tails.
    """
    if shutil.which(QEMU) is None:
        raise GuestBootError(f"{QEMU} not found (apt-get install qemu-system-x86)")
    workdir = _prepare_workdir(workdir)
    accel = _choose_accel(accel)
    cmd_sock = workdir / "cmd.sock"

    argv = qemu_command(
        image,
        workdir,
        accel=accel,
        memory_mb=memory_mb,
        extra_args=extra_args,
        kernel_args=kernel_args,
    )
    (workdir / "qemu.cmdline").write_text(" ".join(argv) + "\n")
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with listener:
        await listener.bind(os.fspath(cmd_sock))
        listener.listen(1)
        with (workdir / "qemu.log").open("wb") as qemu_log:
            started = time.monotonic()
            process = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=qemu_log,
                stderr=subprocess.STDOUT,
            )
        streams: list[trio.SocketStream] = []  # closed in `finally`, whatever happens
        try:

            async def boot() -> GuestVM:
                conn, _ = await listener.accept()
                streams.append(trio.SocketStream(conn))
                guest = GuestVM(workdir=workdir, process=process, stream=streams[0], accel=accel)
                await guest._wait_ready()
                return guest

            try:
                with trio.fail_after(boot_timeout):
                    vm = await _unless_exited(process, boot)
            except (trio.TooSlowError, GuestBootError, GuestChannelError) as exc:
                what = (
                    f"guest not ready within {boot_timeout} s"
                    if isinstance(exc, trio.TooSlowError)
                    else str(exc).split("\n")[0]
                )
                await _terminate(process, 1)
                raise GuestBootError(
                    f"{what} (accel={accel}, QEMU status {process.returncode})\n"
                    f"command: {' '.join(argv)}\n"
                    f"--- console.log (tail) ---\n{_tail(workdir / 'console.log', 40)}\n"
                    f"--- qemu.log (tail) ---\n{_tail(workdir / 'qemu.log', 40)}"
                ) from None
            vm.boot_seconds = time.monotonic() - started
            yield vm
        finally:
            with trio.CancelScope(shield=True):
                for stream in streams:
                    await stream.aclose()
            await _terminate(process, shutdown_grace)
            cmd_sock.unlink(missing_ok=True)
