"""The control socket: JSON lines in, replies and events out.

Each connection has a reader (this task) and a writer task.  Requests run
concurrently, at most ``max_inflight`` per connection: when that many are
running the reader stops reading, so a client that sends without reading
replies is slowed down instead of growing the agent's memory.  Events for a
subscriber go through a bounded queue; a subscriber that falls too far
behind is disconnected (and logged) rather than buffered without end.
A client closing its side lets in-flight requests finish: an ``add`` is
never left half-done because its client went away.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any

import structlog
import trio

from agent import protocol
from agent.config import Config
from agent.daemon import Daemon
from agent.errors import AgentError, Busy, PermissionDenied, StartupError
from agent.nbdkit import check_socket_path, open_listener

log = structlog.get_logger()

EVENT_QUEUE = 1024


def _prepare_path(path: Path) -> None:
    """Refuse a live socket at ``path``; remove a stale one."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
    except OSError as err:
        if err.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise StartupError(f"cannot check {path}: {err}") from err
        log.info("control-socket-stale", path=str(path))
        path.unlink(missing_ok=True)
    else:
        raise StartupError(f"{path} is in use by a running agent")
    finally:
        probe.close()


def peer_credentials(stream: trio.SocketStream) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    raw = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                   struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def _groups_of(pid: int) -> set[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


def peer_allowed(config: Config, pid: int, uid: int, gid: int) -> bool:
    """The agent's own uid, root, and the configured uids and groups."""
    if uid in (0, os.geteuid()) or uid in config.allowed_uids:
        return True
    if not config.allowed_gids:
        return False
    return bool(({gid} | _groups_of(pid)) & config.allowed_gids)


def bind_control_socket(path: Path, config: Config | None = None) -> trio.socket.SocketType:
    """Bind and listen on the control socket.

    Mode 0600, or 0666 when other uids or groups are allowed: then every
    connection is checked with SO_PEERCRED (``peer_allowed``).

    Raises StartupError if the path is too long, in use by a live agent, or
    cannot be bound.  A stale socket file is replaced.
    """
    try:
        check_socket_path(path)
    except AgentError as err:
        raise StartupError(err.message) from err
    _prepare_path(path)
    try:
        sock = open_listener(path, backlog=128)
    except OSError as err:
        raise StartupError(f"cannot listen on {path}: {err}") from err
    if config is not None and (config.allowed_uids or config.allowed_gids):
        path.chmod(0o666)
    return trio.socket.from_stdlib_socket(sock)


class _Connection:
    def __init__(self, stream: trio.SocketStream, daemon: Daemon, config: Config) -> None:
        self.stream = stream
        self.daemon = daemon
        self.config = config
        self.out_send, self.out_recv = trio.open_memory_channel[bytes](
            config.max_inflight + EVENT_QUEUE)
        self.inflight = trio.Semaphore(config.max_inflight)
        self.subscribed = False
        self.scope = trio.CancelScope()

    def on_event(self, ev: dict[str, Any]) -> None:
        try:
            self.out_send.send_nowait(protocol.encode(ev))
        except trio.WouldBlock:
            log.warning("subscriber-too-slow", queued=EVENT_QUEUE)
            self.daemon.subscribers.discard(self.on_event)
            self.scope.cancel()
        except trio.ClosedResourceError:
            self.daemon.subscribers.discard(self.on_event)

    async def writer(self) -> None:
        async with self.out_recv:
            try:
                async for line in self.out_recv:
                    await self.stream.send_all(line)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The peer is gone: keep draining so in-flight requests
                # finish (an add is never cut in half by a vanished client).
                async for _line in self.out_recv:
                    pass

    async def handle(self, rid: protocol.RequestId, req: protocol.Request | None,
                     err: AgentError | None) -> None:
        try:
            if err is None:
                assert req is not None
                with structlog.contextvars.bound_contextvars(request_id=rid, op=req.op):
                    reply = await self._dispatch(req)
            else:
                reply = protocol.error_reply(rid, err)
            await self.out_send.send(reply)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            self.inflight.release()

    async def _dispatch(self, req: protocol.Request) -> bytes:
        try:
            if req.op == "subscribe":
                if not self.subscribed:
                    self.subscribed = True
                    self.daemon.subscribers.add(self.on_event)
                result: dict[str, Any] = {"subscribed": True}
            else:
                handler = getattr(self.daemon, f"op_{req.op}")
                result = await handler(req.args)
        except AgentError as err:
            log.info("request-failed", code=err.code, error=err.message)
            return protocol.error_reply(req.id, err)
        except Exception as err:
            # A bug must cost one request, not every disk of every client.
            log.exception("request-crashed")
            return protocol.error_reply(req.id, AgentError(f"internal error: {err!r}"))
        return protocol.ok_reply(req.id, result)

    async def serve(self) -> None:
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.writer)
                    await self._read_requests(nursery)
                    # EOF: finish what is in flight, then close the writer.
                    for _ in range(self.config.max_inflight):
                        await self.inflight.acquire()
                    self.daemon.subscribers.discard(self.on_event)
                    await self.out_send.aclose()
        finally:
            self.daemon.subscribers.discard(self.on_event)

    async def _read_requests(self, nursery: trio.Nursery) -> None:
        try:
            async for item in protocol.read_lines(self.stream, self.config.max_line):
                await self.inflight.acquire()
                if isinstance(item, AgentError):
                    nursery.start_soon(self.handle, None, None, item)
                    continue
                try:
                    req = protocol.parse_request(item)
                except AgentError as err:
                    nursery.start_soon(self.handle, err.context.get("id"), None, err)
                else:
                    nursery.start_soon(self.handle, req.id, req, None)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
            log.debug("control-connection-broken", error=str(err))


class ControlServer:
    """Listens on the control socket and serves each connection."""

    def __init__(self, config: Config, daemon: Daemon) -> None:
        self.config = config
        self.daemon = daemon
        self.connections = 0

    async def run(self, sock: trio.socket.SocketType, *,
                  task_status: trio.TaskStatus[list[trio.SocketListener]] = (
                      trio.TASK_STATUS_IGNORED)) -> None:
        """Serve ``sock`` (from ``bind_control_socket``) until cancelled.

        The socket file is removed on the way out.
        """
        try:
            log.info("control-listening", path=str(self.config.control_path))
            await trio.serve_listeners(self._serve_one, [trio.SocketListener(sock)],
                                       task_status=task_status)
        finally:
            self.config.control_path.unlink(missing_ok=True)

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        async with stream:
            pid, uid, gid = peer_credentials(stream)
            if not peer_allowed(self.config, pid, uid, gid):
                log.warning("control-peer-refused", peer_pid=pid, peer_uid=uid, peer_gid=gid)
                denied = PermissionDenied(f"uid {uid} may not use this agent")
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(protocol.error_reply(None, denied))
                return
            if self.connections >= self.config.max_connections:
                err = Busy(f"too many control connections (max {self.config.max_connections})")
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(protocol.error_reply(None, err))
                return
            self.connections += 1
            try:
                await _Connection(stream, self.daemon, self.config).serve()
            finally:
                self.connections -= 1
