"""The control protocol: JSON lines, request models, replies, events.

One UTF-8 JSON object per line, each way.  A request is a flat object with an
optional ``id`` (string, integer or null; echoed in the reply), an ``op``, and
the op's own fields.  Replies are ``{"id", "ok": true, "result"}`` or
``{"id", "ok": false, "error": {"code", "message", ...}}``; events are
``{"event", "disk", "ts", ...}``.  Every request is checked against its
model (unknown fields, wrong types, bad ids) before anything runs.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import msgspec
import trio

from agent.errors import AgentError, BadRequest, LineTooLong, UnknownOp

DISK_ID = r"^[A-Za-z][A-Za-z0-9_-]{0,19}$"
DiskId = Annotated[str, msgspec.Meta(pattern=DISK_ID)]
RequestId = str | int | None
WError = Literal["report", "ignore", "enospc", "stop"]
RError = Literal["report", "ignore", "stop"]


class _Args(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class FilterArg(_Args, frozen=True):
    name: str
    params: dict[str, str] = {}


class PingArgs(_Args, frozen=True):
    pass


class ListArgs(_Args, frozen=True):
    pass


class SubscribeArgs(_Args, frozen=True):
    pass


class AddArgs(_Args, frozen=True):
    plugin: str
    disk: DiskId | None = None
    params: dict[str, str] = {}
    #: outermost (client side) first; a name or {"name", "params"}
    filters: list[str | FilterArg] = []
    readonly: bool = False
    driver: Literal["virtio-blk-pci", "scsi-hd"] = "virtio-blk-pci"
    #: seconds QEMU holds I/O while nbdkit is replaced (default: config)
    reconnect_delay: Annotated[int, msgspec.Meta(ge=0, le=3600)] | None = None
    werror: WError | None = None
    rerror: RError | None = None
    #: parameters that must stay secret (curl password/proxy-password/cookie,
    #: ssh password): passed through a pipe, never shown anywhere
    secrets: dict[str, str] = {}


class RemoveArgs(_Args, frozen=True):
    disk: DiskId


class RestartArgs(_Args, frozen=True):
    disk: DiskId


OPS: dict[str, type[_Args]] = {
    "ping": PingArgs,
    "add": AddArgs,
    "remove": RemoveArgs,
    "list": ListArgs,
    "restart": RestartArgs,
    "subscribe": SubscribeArgs,
}


class Request(msgspec.Struct, frozen=True):
    id: RequestId
    op: str
    args: _Args


def parse_request(line: bytes) -> Request:
    """Decode and validate one request line.

    Raises BadRequest (not JSON, not an object, bad id/op, fields of the
    wrong type, unknown or missing fields) or UnknownOp.  Either carries the
    id, when one could be read, in ``context["id"]``.
    """
    try:
        obj = msgspec.json.decode(line)
    except msgspec.DecodeError as err:
        raise BadRequest(f"not valid JSON: {err}") from err
    except RecursionError as err:
        raise BadRequest("JSON nested too deeply") from err
    if not isinstance(obj, dict):
        raise BadRequest(f"a request must be a JSON object, not {type(obj).__name__}")
    rid = obj.pop("id", None)
    if rid is not None and (not isinstance(rid, str | int) or isinstance(rid, bool)):
        raise BadRequest("'id' must be a string, an integer or null")
    op = obj.pop("op", None)
    try:
        if not isinstance(op, str):
            raise BadRequest("'op' is missing or not a string")
        model = OPS.get(op)
        if model is None:
            raise UnknownOp(f"unknown op {op[:64]!r}; known: {', '.join(sorted(OPS))}")
        try:
            args = msgspec.convert(obj, model)
        except msgspec.ValidationError as err:
            raise BadRequest(f"{op}: {err}") from err
    except AgentError as err:
        err.context["id"] = rid
        raise
    return Request(rid, op, args)


def encode(obj: dict[str, Any]) -> bytes:
    """One protocol line (with its newline)."""
    return msgspec.json.encode(obj) + b"\n"


def ok_reply(rid: RequestId, result: dict[str, Any]) -> bytes:
    return encode({"id": rid, "ok": True, "result": result})


def error_reply(rid: RequestId, err: AgentError) -> bytes:
    wire = err.to_wire()
    wire.pop("id", None)
    return encode({"id": rid, "ok": False, "error": wire})


def event(name: str, disk: str | None, **fields: Any) -> dict[str, Any]:
    return {"event": name, "disk": disk, "ts": round(time.time(), 6), **fields}


async def read_lines(stream: trio.abc.ReceiveStream,
                     max_line: int) -> AsyncIterator[bytes | LineTooLong]:
    """Yield complete lines (without newline) from ``stream`` until EOF.

    A line longer than ``max_line`` bytes yields one LineTooLong and is
    skipped up to its newline, so the connection stays usable.  Memory stays
    bounded by ``max_line`` whatever the peer sends.  A partial last line at
    EOF is dropped.
    """
    buf = bytearray()
    skipping = False
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        buf += data
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > max_line:
                    if not skipping:
                        skipping = True
                        yield LineTooLong(f"line longer than {max_line} bytes")
                    buf.clear()
                break
            if skipping:
                skipping = False
            elif nl > max_line:
                yield LineTooLong(f"line longer than {max_line} bytes")
            else:
                line = bytes(buf[:nl]).strip()
                if line:
                    yield line
            del buf[: nl + 1]
