"""A minimal NBD client: just enough to tell that an nbdkit really serves.

``probe_export`` performs the fixed-newstyle handshake and ``NBD_OPT_GO`` on
the default export (the plugin is opened, the size is read), then
disconnects.  ``probe_alive`` only reads the greeting and aborts: cheap
enough to run every few seconds, and it still needs nbdkit's accept loop and
a worker thread to answer.  Neither does any data I/O.
"""

from __future__ import annotations

import struct
from pathlib import Path

import trio

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_ABORT = 2
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
REP_FLAG_ERROR = 1 << 31
INFO_EXPORT = 0
CMD_DISC = 2


class NbdProtocolError(Exception):
    """The server broke the protocol or refused the export."""


async def _recv_exactly(stream: trio.SocketStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise NbdProtocolError(f"server closed the connection ({len(buf)}/{n} bytes)")
        buf += chunk
    return bytes(buf)


async def _greet(stream: trio.SocketStream) -> None:
    hello = await _recv_exactly(stream, 18)
    if hello[:8] != NBDMAGIC or hello[8:16] != IHAVEOPT:
        raise NbdProtocolError("not a newstyle NBD server")
    (server_flags,) = struct.unpack(">H", hello[16:])
    if not server_flags & FLAG_FIXED_NEWSTYLE:
        raise NbdProtocolError("server does not support fixed newstyle")
    flags = FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES)
    await stream.send_all(struct.pack(">I", flags))


def _option(opt: int, data: bytes = b"") -> bytes:
    return IHAVEOPT + struct.pack(">II", opt, len(data)) + data


async def probe_alive(path: Path) -> None:
    """Greeting plus NBD_OPT_ABORT.  Raises OSError or NbdProtocolError."""
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await _greet(stream)
        await stream.send_all(_option(OPT_ABORT))


async def probe_export(path: Path) -> int:
    """Handshake and NBD_OPT_GO on the default export; returns its size.

    Raises OSError (no socket), NbdProtocolError (refused or broken).
    Cancellation closes the connection.
    """
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await _greet(stream)
        # name length 0 (default export), request NBD_INFO_EXPORT only
        await stream.send_all(_option(OPT_GO, struct.pack(">IH", 0, 0)))
        size: int | None = None
        while True:
            magic, _opt, rtype, length = struct.unpack(">QIII", await _recv_exactly(stream, 20))
            if magic != REPLY_MAGIC:
                raise NbdProtocolError("bad option reply magic")
            data = await _recv_exactly(stream, length) if length else b""
            if rtype & REP_FLAG_ERROR:
                text = data.decode("utf-8", "replace")
                raise NbdProtocolError(f"export refused (NBD error {rtype & 0xFFFF}): {text}")
            if rtype == REP_INFO and len(data) >= 12:
                (itype,) = struct.unpack(">H", data[:2])
                if itype == INFO_EXPORT:
                    (size,) = struct.unpack(">Q", data[2:10])
            elif rtype == REP_ACK:
                break
        if size is None:
            raise NbdProtocolError("server sent no export size")
        await stream.send_all(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        return size
