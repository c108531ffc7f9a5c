"""The asyncio fence: qemu.qmp behind a small trio-native interface.

This is the only module that imports asyncio, trio_asyncio or qemu.qmp.
``open_qmp`` opens a trio-asyncio loop, connects a ``QMPClient`` and yields a
``QmpConnection`` whose methods are plain trio coroutines; qemu.qmp's
exceptions are translated into the agent's own (``agent.errors``) here.

Memory hygiene for a process that runs for months: qemu.qmp's default
listener keeps every event in a history list that is never trimmed.  It is
muted with an event filter that accepts nothing, and events reach the agent
through ``_Forwarder``, which keeps no history and feeds a bounded trio
channel.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import structlog
import trio
import trio_asyncio
from qemu.qmp import ConnectError, EventListener, ExecInterruptedError, ExecuteError, QMPClient
from qemu.qmp.error import QMPError
from qemu.qmp.message import Message
from qemu.qmp.protocol import Runstate, StateError

from agent.errors import QmpDisconnected, QmpError, QmpTimeout, StartupError

log = structlog.get_logger()

EVENT_BUFFER = 4096


class _Forwarder(EventListener):
    """Hands each QMP event to a trio channel; keeps no history."""

    def __init__(self, send: trio.MemorySendChannel[dict[str, Any]]) -> None:
        super().__init__()
        self._send = send
        self.dropped = 0

    async def put(self, event: Message) -> None:
        try:
            self._send.send_nowait(dict(event))
        except trio.WouldBlock:
            self.dropped += 1
            log.error("qmp-event-dropped", qmp_event=event.get("event"), dropped=self.dropped)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass


class QmpConnection:
    """One QMP session, seen from trio."""

    def __init__(self, client: QMPClient, events: trio.MemoryReceiveChannel[dict[str, Any]],
                 timeout: float) -> None:
        self._client = client
        self.events = events
        self.timeout = timeout
        self.version = ""
        #: uid of the QEMU process (SO_PEERCRED), None if unknown
        self.peer_uid: int | None = None
        self.disconnected = trio.Event()

    async def execute(self, cmd: str, args: dict[str, Any] | None = None, *,
                      timeout: float | None = None) -> Any:
        """Run one QMP command and return its ``return`` value.

        Raises QmpError (QEMU refused it; ``qmp_class`` and the text are
        QEMU's), QmpTimeout (no reply within the deadline; the command may
        still take effect), QmpDisconnected.  Cancellation abandons the reply.
        """
        if self.disconnected.is_set():
            raise QmpDisconnected("the QMP connection is closed", command=cmd)
        try:
            with trio.fail_after(self.timeout if timeout is None else timeout):
                return await trio_asyncio.aio_as_trio(self._client.execute)(cmd, args)
        except ExecuteError as err:
            raise QmpError(f"{cmd}: {err.error_class}: {err}", command=cmd,
                           qmp_class=err.error_class) from err
        except trio.TooSlowError as err:
            raise QmpTimeout(f"{cmd}: no reply from QEMU within "
                             f"{self.timeout if timeout is None else timeout:g}s",
                             command=cmd) from err
        except (ExecInterruptedError, StateError, EOFError, OSError) as err:
            raise QmpDisconnected(f"{cmd}: QMP connection lost: {err}", command=cmd) from err

    async def _watch_runstate(self, send: trio.MemorySendChannel[dict[str, Any]]) -> None:
        async with send:
            while True:
                state = await trio_asyncio.aio_as_trio(self._client.runstate_changed)()
                if state in (Runstate.DISCONNECTING, Runstate.IDLE):
                    self.disconnected.set()
                    return


@asynccontextmanager
async def open_qmp(path: Path, *, timeout: float = 30.0,
                   name: str = "nbd-hotplug") -> AsyncIterator[QmpConnection]:
    """Connect to QEMU's QMP socket at ``path``; disconnect on exit.

    Raises StartupError if the socket is unreachable, does not speak QMP, or
    does not answer within ``timeout``.
    """
    async with trio_asyncio.open_loop():
        client = QMPClient(name)
        client.events.event_filter = lambda _event: False
        send, recv = trio.open_memory_channel[dict[str, Any]](EVENT_BUFFER)
        client.register_listener(_Forwarder(send))
        # Connect the socket here, to learn QEMU's uid (SO_PEERCRED), and hand
        # it to qemu.qmp.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            with trio.fail_after(timeout):
                await trio.socket.from_stdlib_socket(sock).connect(str(path))
            pid, uid, gid = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            with trio.fail_after(timeout):
                await trio_asyncio.aio_as_trio(client.connect)(sock)
        except OSError as err:
            sock.close()
            raise StartupError(f"cannot attach to QMP at {path}: {err}") from err
        except ConnectError as err:
            raise StartupError(f"cannot attach to QMP at {path}: {err}") from err
        except trio.TooSlowError as err:
            sock.close()
            raise StartupError(f"no QMP greeting from {path} within {timeout:g}s") from err
        conn = QmpConnection(client, recv, timeout)
        conn.peer_uid = uid
        log.debug("qmp-peer", pid=pid, uid=uid, gid=gid)
        try:
            greeting = client.greeting
            if greeting is None:
                raise StartupError(f"{path} sent no QMP greeting")
            try:
                ver = await conn.execute("query-version")
                q = ver["qemu"]
                pkg = str(ver.get('package', '')).strip()
                conn.version = f"{q['major']}.{q['minor']}.{q['micro']}"
                if pkg:
                    conn.version += f" ({pkg})"
            except (QmpError, KeyError, TypeError) as err:
                raise StartupError(f"{path} does not look like QEMU: {err}") from err
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn._watch_runstate, send)
                try:
                    yield conn
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await _disconnect(client)


async def _disconnect(client: QMPClient) -> None:
    try:
        await trio_asyncio.aio_as_trio(client.disconnect)()
    except (QMPError, OSError, EOFError, asyncio.IncompleteReadError) as err:
        # disconnect() re-raises whatever broke the connection; by now that
        # has been reported as QmpDisconnected, so only note it.
        log.debug("qmp-disconnect-error", error=str(err))
