"""Unit tests of the wire protocol: request parsing and line framing."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from agent import protocol
from agent.errors import BadRequest, LineTooLong, UnknownOp


def test_parse_add_with_defaults() -> None:
    req = protocol.parse_request(b'{"id": 7, "op": "add", "plugin": "memory", '
                                 b'"params": {"size": "1M"}}')
    assert req.id == 7 and req.op == "add"
    assert isinstance(req.args, protocol.AddArgs)
    assert req.args.driver == "virtio-blk-pci" and req.args.readonly is False
    assert req.args.params == {"size": "1M"} and req.args.disk is None


@pytest.mark.parametrize(("line", "error", "rid"), [
    (b"nope", BadRequest, None),
    (b'"a string"', BadRequest, None),
    (b'{"id": 1}', BadRequest, 1),
    (b'{"id": "x", "op": "fly"}', UnknownOp, "x"),
    (b'{"id": [1], "op": "ping"}', BadRequest, None),
    (b'{"id": true, "op": "ping"}', BadRequest, None),
    (b'{"id": 2, "op": "add", "plugin": "file", "params": {"file": 3}}', BadRequest, 2),
    (b'{"id": 3, "op": "add", "plugin": "file", "bogus": 1}', BadRequest, 3),
    (b'{"id": 4, "op": "add", "plugin": "file", "disk": "has space"}', BadRequest, 4),
    (b'{"id": 5, "op": "add", "plugin": "file", "disk": "' + b"x" * 21 + b'"}', BadRequest, 5),
    (b'{"id": 6, "op": "add", "plugin": "file", "driver": "ide-hd"}', BadRequest, 6),
    (b'{"id": 7, "op": "add", "plugin": "file", "reconnect_delay": -1}', BadRequest, 7),
    (b'{"id": 8, "op": "remove"}', BadRequest, 8),
    (b"[" * 50_000 + b"]" * 50_000, BadRequest, None),
    (b'{"op": "ping", "id": 1, "x": "\\ud800"}', BadRequest, None),
])
def test_parse_errors(line: bytes, error: type[Exception], rid: object) -> None:
    with pytest.raises(error) as info:
        protocol.parse_request(line)
    assert getattr(info.value, "context", {}).get("id") == rid


def test_error_reply_shape() -> None:
    with pytest.raises(UnknownOp) as info:
        protocol.parse_request(b'{"id": "a", "op": "x"}')
    reply = json.loads(protocol.error_reply("a", info.value))
    assert reply["id"] == "a" and reply["ok"] is False
    assert reply["error"]["code"] == "unknown-op" and "x" in reply["error"]["message"]
    assert "id" not in reply["error"]


async def _lines(chunks: list[bytes], max_line: int) -> list[bytes | str]:
    send, recv = trio.testing.memory_stream_pair()
    out: list[bytes | str] = []

    async def feed() -> None:
        for chunk in chunks:
            await send.send_all(chunk)
        await send.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        async for item in protocol.read_lines(recv, max_line):
            out.append(item.code if isinstance(item, LineTooLong) else item)
    return out


async def test_read_lines_skips_long_line_and_recovers() -> None:
    out = await _lines([b"a\n", b"x" * 30, b"y" * 30, b"\nb\n", b"c" * 5 + b"\nd"], 16)
    assert out == [b"a", "line-too-long", b"b", b"ccccc"]


async def test_read_lines_long_line_in_one_chunk() -> None:
    assert await _lines([b"x" * 40 + b"\nok\n"], 16) == ["line-too-long", b"ok"]


@given(st.lists(st.binary(min_size=1, max_size=30).filter(lambda b: b"\n" not in b.strip()
                                                         and b.strip() != b""),
                min_size=1, max_size=20),
       st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=20))
def test_read_lines_any_chunking(lines: list[bytes], cuts: list[int]) -> None:
    data = b"".join(line + b"\n" for line in lines)
    chunks, pos, i = [], 0, 0
    while pos < len(data):
        size = cuts[i % len(cuts)]
        chunks.append(data[pos:pos + size])
        pos += size
        i += 1
    assert trio.run(_lines, chunks, 64) == [line.strip() for line in lines]
