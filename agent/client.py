"""A control-socket client, used by the CLI (and handy for scripts and tests).

``open_control`` connects and yields a ``ControlClient``; ``call`` sends one
request and returns its reply (requests may overlap: replies are matched by
id), and ``events`` yields the event lines of a subscribed connection.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from agent import protocol

MAX_LINE = 16 << 20


class ControlClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._ids = itertools.count(1)
        self._waiting: dict[Any, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._ev_send, self._ev_recv = trio.open_memory_channel[dict[str, Any]](10_000)
        self._stray_send, self._stray_recv = trio.open_memory_channel[dict[str, Any]](10_000)

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send ``{"op": op, **fields}`` and return the whole reply object.

        Raises EOFError if the agent closed the connection first.
        """
        rid = next(self._ids)
        send, recv = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[rid] = send
        try:
            await self.stream.send_all(protocol.encode({"id": rid, "op": op, **fields}))
            async with recv:
                try:
                    return await recv.receive()
                except trio.EndOfChannel:
                    raise EOFError("the agent closed the connection") from None
        finally:
            self._waiting.pop(rid, None)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        async for ev in self._ev_recv:
            yield ev

    async def next_event(self) -> dict[str, Any]:
        return await self._ev_recv.receive()

    async def next_reply(self) -> dict[str, Any]:
        """The next reply that answers no ``call`` (e.g. to ``send_raw`` lines)."""
        return await self._stray_recv.receive()

    async def _read(self) -> None:
        try:
            async for line in protocol.read_lines(self.stream, MAX_LINE):
                if isinstance(line, Exception):
                    continue
                msg = json.loads(line)
                if "event" in msg:
                    self._ev_send.send_nowait(msg)
                elif msg.get("id") in self._waiting:
                    self._waiting[msg["id"]].send_nowait(msg)
                else:
                    self._stray_send.send_nowait(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            for send in self._waiting.values():
                send.close()
            self._ev_send.close()
            self._stray_send.close()


@asynccontextmanager
async def open_control(path: Path) -> AsyncIterator[ControlClient]:
    """Connect to the agent's control socket.  Raises OSError if it is not there."""
    stream = await trio.open_unix_socket(str(path))
    async with stream, trio.open_nursery() as nursery:
        client = ControlClient(stream)
        nursery.start_soon(client._read)
        try:
            yield client
        finally:
            nursery.cancel_scope.cancel()
