"""The NBD probe client against a real nbdkit and against things that are not NBD."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import trio

from agent import nbd


async def _serve_bytes(sock: Path, payload: bytes, task_status: trio.TaskStatus[None]) -> None:
    with trio.socket.socket(trio.socket.AF_UNIX) as listener:
        await listener.bind(str(sock))
        listener.listen(1)
        task_status.started()
        conn, _ = await listener.accept()
        with conn:
            await conn.send(payload)
            await trio.sleep_forever()


async def test_probe_real_nbdkit(short_tmp: Path) -> None:
    sock = short_tmp / "n.sock"
    proc = await trio.lowlevel.open_process(
        ["nbdkit", "--foreground", "-U", str(sock), "memory", "size=3M"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        with trio.fail_after(10):
            while True:
                try:
                    size = await nbd.probe_export(sock)
                    break
                except OSError:
                    await trio.sleep(0.02)
        assert size == 3 << 20
        await nbd.probe_alive(sock)
    finally:
        proc.terminate()
        await proc.wait()


@pytest.mark.parametrize("payload", [b"HTTP/1.1 200 OK\r\n\r\n", b"NBDMAGICIHAVEOPS\0\3",
                                     b"NBDMAGICIHAVEOPT\0\0"])
async def test_probe_rejects_non_nbd(short_tmp: Path, payload: bytes) -> None:
    sock = short_tmp / "x.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(_serve_bytes, sock, payload)
        with trio.fail_after(5), pytest.raises(nbd.NbdProtocolError):
            await nbd.probe_export(sock)
        nursery.cancel_scope.cancel()


async def test_probe_no_socket(short_tmp: Path) -> None:
    with pytest.raises(OSError):
        await nbd.probe_export(short_tmp / "missing.sock")
