"""Minimal trio QMP client (raw JSON over a unix socket) for tests and the self-check.

Usage::

    async with open_qmp(vm.test_qmp_path) as qmp:
        await qmp.execute("device_del", {"id": "vblk1"})
        await qmp.wait_event("DEVICE_DELETED", match={"device": "vblk1"}, timeout=10)

``execute`` and ``wait_event`` may run concurrently from several tasks.  Events
are kept in a backlog from the moment the connection is up until a
``wait_event`` call consumes them, so an event that arrives before one starts
waiting for it is not lost.  Timeouts are parameters (with defaults) rather
than left to the caller's cancel scopes so that a test can never hang forever
on a wedged QEMU; they raise :class:`TimeoutError`.

Note that a QEMU QMP socket serves one client at a time: a second connection
just waits until the first one closes.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import trio

__all__ = ["QMPClient", "QMPConnectionError", "QMPError", "open_qmp"]

_MAX_BACKLOG = 10_000
_MAX_LINE = 16 * 1024 * 1024


class QMPError(Exception):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error: Mapping[str, Any]) -> None:
        self.command = command
        self.error_class = str(error.get("class", "GenericError"))
        self.desc = str(error.get("desc", ""))
        super().__init__(f"{command}: {self.error_class}: {self.desc}")


class QMPConnectionError(ConnectionError):
    """The QMP connection failed or was closed (e.g. QEMU exited)."""


class QMPClient:
    """One QMP session; create it with :func:`open_qmp`.

    There is no background reader task (a nursery inside the context manager
    would wrap the caller's exceptions in an ``ExceptionGroup``): whichever
    task needs a message reads one under a lock and files it, replies by id
    and events into the backlog, so concurrent callers still work.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buf = bytearray()
        self._send_lock = trio.Lock()
        self._read_lock = trio.Lock()
        self._ids = itertools.count(1)
        self._waiting: set[str] = set()
        self._replies: dict[str, dict[str, Any]] = {}
        self._events: list[dict[str, Any]] = []
        self._closed: str | None = None
        self.greeting: dict[str, Any] = {}

    async def _read_message(self) -> dict[str, Any]:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl]).strip()
                del self._buf[: nl + 1]
                if not line:
                    continue
                msg = json.loads(line)
                if not isinstance(msg, dict):
                    raise QMPConnectionError(f"unexpected QMP message: {line!r}")
                return msg
            if len(self._buf) > _MAX_LINE:
                raise QMPConnectionError("QMP message too long")
            data = await self._stream.receive_some(65536)
            if not data:
                raise QMPConnectionError("QMP connection closed by QEMU")
            self._buf += data

    async def _send(self, msg: Mapping[str, Any]) -> None:
        data = json.dumps(msg).encode() + b"\n"
        async with self._send_lock:
            # Never leave half a command on the wire.
            with trio.CancelScope(shield=True):
                await self._stream.send_all(data)

    async def _handshake(self) -> None:
        self.greeting = await self._read_message()
        if "QMP" not in self.greeting:
            raise QMPConnectionError(f"not a QMP greeting: {self.greeting!r}")
        await self._send({"execute": "qmp_capabilities", "id": "caps"})
        while True:
            msg = await self._read_message()
            if msg.get("id") == "caps":
                if "error" in msg:
                    raise QMPError("qmp_capabilities", msg["error"])
                return
            if "event" in msg:
                self._push_event(msg)

    def _push_event(self, msg: dict[str, Any]) -> None:
        self._events.append(msg)
        del self._events[:-_MAX_BACKLOG]

    async def _pump(self) -> None:
        """Read one message (caller holds ``_read_lock``) and file it."""
        if self._closed is not None:
            raise QMPConnectionError(f"QMP connection closed: {self._closed}")
        try:
            msg = await self._read_message()
        except (
            QMPConnectionError,
            OSError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            ValueError,
        ) as exc:
            self._closed = str(exc) or type(exc).__name__
            raise QMPConnectionError(f"QMP connection closed: {self._closed}") from exc
        if "event" in msg:
            self._push_event(msg)
        elif str(msg.get("id")) in self._waiting:
            self._replies[str(msg["id"])] = msg

    # ------------------------------------------------------------ API
    @property
    def closed(self) -> bool:
        """True once the connection is gone."""
        return self._closed is not None

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float = 30,
    ) -> Any:
        """Run a QMP command and return its ``return`` value; raise :class:`QMPError`."""
        cmd_id = f"c{next(self._ids)}"
        msg: dict[str, Any] = {"execute": command, "id": cmd_id}
        if arguments:
            msg["arguments"] = dict(arguments)
        self._waiting.add(cmd_id)
        try:
            with trio.fail_after(timeout):
                await self._send(msg)
                while cmd_id not in self._replies:
                    async with self._read_lock:
                        if cmd_id not in self._replies:
                            await self._pump()
        except trio.TooSlowError:
            raise TimeoutError(f"QMP {command}: no reply within {timeout} s") from None
        finally:
            self._waiting.discard(cmd_id)
        reply = self._replies.pop(cmd_id)
        if "error" in reply:
            raise QMPError(command, reply["error"])
        return reply.get("return")

    def _take_event(self, name: str, match: Mapping[str, Any] | None) -> dict[str, Any] | None:
        for i, ev in enumerate(self._events):
            if ev.get("event") != name:
                continue
            data = ev.get("data") or {}
            if match and any(data.get(k) != v for k, v in match.items()):
                continue
            return self._events.pop(i)
        return None

    async def wait_event(
        self,
        name: str,
        *,
        match: Mapping[str, Any] | None = None,
        timeout: float = 30,
    ) -> dict[str, Any]:
        """Consume and return the first event ``name`` whose ``data`` contains ``match``."""
        try:
            with trio.fail_after(timeout):
                while True:
                    async with self._read_lock:
                        ev = self._take_event(name, match)
                        if ev is not None:
                            return ev
                        await self._pump()
        except trio.TooSlowError:
            raise TimeoutError(
                f"QMP event {name} {dict(match or {})} not seen within {timeout} s"
            ) from None

    def events(self) -> list[dict[str, Any]]:
        """A copy of the not yet consumed events."""
        return list(self._events)


@asynccontextmanager
async def open_qmp(
    path: str | os.PathLike[str],
    *,
    timeout: float = 10,
) -> AsyncIterator[QMPClient]:
    """Connect to a QMP unix socket, negotiate capabilities, yield a :class:`QMPClient`."""
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_unix_socket(os.fspath(path))
    except trio.TooSlowError:
        raise QMPConnectionError(f"connect to {path}: timed out") from None
    except OSError as exc:
        raise QMPConnectionError(f"connect to {path}: {exc}") from exc
    async with stream:
        client = QMPClient(stream)
        try:
            with trio.fail_after(timeout):
                await client._handshake()
        except trio.TooSlowError:
            raise QMPConnectionError(
                f"{path}: no QMP greeting within {timeout} s (another client connected?)"
            ) from None
        yield client
