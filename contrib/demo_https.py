"""A small HTTPS file server with byte ranges, for the demo's remote disk.

It serves the regular files directly inside one directory, over TLS with a
certificate given on the command line, speaking HTTP/1.1 with keep-alive:

* ``GET`` and ``HEAD``, with ``Content-Length``, ``Accept-Ranges: bytes``
  (nbdkit's curl plugin refuses a server without it), ``Last-Modified``;
* a single ``Range: bytes=A-B`` / ``A-`` / ``-N`` gets ``206 Partial Content``
  with ``Content-Range``; an unsatisfiable one ``416`` with
  ``Content-Range: bytes */SIZE``; several ranges, or a malformed header, are
  ignored and the whole file is sent (RFC 9110 allows that).

Run ``python -m contrib.demo_https --root DIR --cert CERT --key KEY``: it
binds 127.0.0.1 on a free port, prints ``READY <port>`` on stdout and serves
until SIGTERM/SIGINT.  From trio, :func:`open_https_server` runs it as a
child process (always reaped) and :func:`make_self_signed_cert` makes a
throw-away certificate for 127.0.0.1 with the ``openssl`` CLI.
"""

from __future__ import annotations

import argparse
import email.utils
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import BinaryIO

import trio

__all__ = [
    "HttpsServer",
    "RangeHandler",
    "main",
    "make_self_signed_cert",
    "open_https_server",
    "parse_range",
]

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_COPY_CHUNK = 1 << 20


def parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """``(first, last)`` (inclusive) for a satisfiable single byte range,
    ``None`` to send the whole file (no header, several ranges, malformed), or
    ``"unsatisfiable"``."""
    if header is None:
        return None
    m = _RANGE.fullmatch(header.strip())
    if m is None:
        return None
    first_s, last_s = m.groups()
    if not first_s:
        if not last_s:
            return None
        length = int(last_s)
        if length == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - length), size - 1
    first = int(first_s)
    last = int(last_s) if last_s else size - 1
    if last_s and last < first:
        return None  # invalid: ignored
    if first >= size:
        return "unsatisfiable"
    return first, min(last, size - 1)


class RangeHandler(BaseHTTPRequestHandler):
    """GET/HEAD of files in ``server.root`` with single byte ranges."""

    protocol_version = "HTTP/1.1"
    server_version = "nbdhp-demo-https/1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the demo prints what matters

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, *, body: bool) -> None:
        path = self._resolve()
        if path is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        with path.open("rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            rng = parse_range(self.headers.get("Range"), size)
            if rng == "unsatisfiable":
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if isinstance(rng, tuple):
                first, last = rng
                self.send_response(HTTPStatus.PARTIAL_CONTENT)
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            else:
                first, last = 0, size - 1
                self.send_response(HTTPStatus.OK)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(last - first + 1))
            self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
            self.end_headers()
            if body:
                self._copy(f, first, last - first + 1)
        self.server.count(ranged=isinstance(rng, tuple))

    def _copy(self, f: BinaryIO, offset: int, length: int) -> None:
        f.seek(offset)
        while length > 0:
            data = f.read(min(length, _COPY_CHUNK))
            if not data:  # the file shrank under us: the client sees a short body
                self.close_connection = True
                return
            self.wfile.write(data)
            length -= len(data)

    def _resolve(self) -> Path | None:
        name = self.path.split("?", 1)[0].lstrip("/")
        if not name or "/" in name or name.startswith("."):
            return None
        path = self.server.root / name
        return path if path.is_file() else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], root: Path, context: ssl.SSLContext) -> None:
        super().__init__(addr, RangeHandler)
        self.root = root
        self.context = context
        self.requests = 0
        self.ranged = 0
        self._lock = threading.Lock()

    def get_request(self) -> tuple[socket.socket, object]:
        conn, addr = super().get_request()
        # The TLS handshake happens in the handler's thread, on first read, so
        # a slow client cannot block accept().
        return self.context.wrap_socket(conn, server_side=True,
                                        do_handshake_on_connect=False), addr

    def count(self, *, ranged: bool) -> None:
        with self._lock:
            self.requests += 1
            self.ranged += ranged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m contrib.demo_https",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="directory to serve")
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    args = parser.parse_args(argv)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    server = _Server((args.host, args.port), args.root.resolve(), context)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever to return: not from its own thread.
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"READY {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    print(f"STATS requests={server.requests} ranged={server.ranged}", flush=True)
    return 0


# --------------------------------------------------------------------------- trio side


@dataclass
class HttpsServer:
    """A running :mod:`contrib.demo_https` server."""

    process: trio.Process
    port: int
    cert: Path
    #: filled in when the server stopped: requests served, how many ranged
    requests: int = 0
    ranged: int = 0

    def url(self, name: str) -> str:
        return f"https://127.0.0.1:{self.port}/{name}"


def make_self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A throw-away certificate + key for 127.0.0.1 (openssl CLI).  Raises
    RuntimeError if openssl is missing or fails."""
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl not found (apt-get install openssl)")
    cert, key = directory / "cert.pem", directory / "key.pem"
    proc = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl req failed: {proc.stderr.strip()}")
    key.chmod(0o600)
    return cert, key


@asynccontextmanager
async def open_https_server(root: Path, cert: Path, key: Path,
                            timeout: float = 15) -> AsyncIterator[HttpsServer]:
    """Run the server on 127.0.0.1 (free port) as a child process.

    Raises RuntimeError if it does not report READY within ``timeout``.  On
    exit: SIGTERM, a grace period, SIGKILL; always reaped.
    """
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "contrib.demo_https", "--root", str(root),
         "--cert", str(cert), "--key", str(key)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True,
        cwd=Path(__file__).resolve().parent.parent)
    assert proc.stdout is not None
    out = b""
    try:
        with trio.move_on_after(timeout):
            while b"\n" not in out:
                chunk = await proc.stdout.receive_some(4096)
                if not chunk:
                    break
                out += chunk
        m = re.match(rb"READY (\d+)\n", out)
        if m is None:
            raise RuntimeError(f"the HTTPS server did not start: {out!r}")
        server = HttpsServer(proc, int(m.group(1)), cert)
        yield server
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(5):
                    while chunk := await proc.stdout.receive_some(4096):
                        out += chunk
                    await proc.wait()
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            await proc.stdout.aclose()
    stats = re.search(rb"STATS requests=(\d+) ranged=(\d+)", out)
    if stats:
        server.requests, server.ranged = int(stats.group(1)), int(stats.group(2))


if __name__ == "__main__":
    sys.exit(main())
