"""The command-line client against a real agent: output, --json, exit status."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from agent.client import ControlClient
from tests.conftest import ROOT, Agent, make_image

pytestmark = pytest.mark.e2e


async def cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        return await trio.run_process([sys.executable, "-m", "agent", *args], cwd=ROOT,
                                      stdin=stdin, capture_stdout=True, capture_stderr=True,
                                      check=False)


async def test_cli_round_trip(agent: Agent, ctl: ControlClient, short_tmp: Path) -> None:
    c = ("--control", str(agent.control))
    ping = await cli("ping", *c)
    assert ping.returncode == 0 and ping.stdout.startswith(b"nbd-hotplug ")
    assert b"QEMU 7." in ping.stdout or b"QEMU " in ping.stdout

    image = make_image(short_tmp / "cli.img")
    added = await cli("add", *c, "file", f"file={image}", "--disk", "c1",
                      "--driver", "scsi-hd", "--filter", "retry:retries=2")
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith(b"c1: running (nbdkit pid ")

    table = (await cli("list", *c)).stdout.decode().splitlines()
    assert table[0].split()[:3] == ["DISK", "STATE", "PLUGIN"]
    assert table[1].split()[:3] == ["c1", "running", "file"]
    listed = json.loads((await cli("list", *c, "--json")).stdout)
    [disk] = listed["result"]["disks"]
    assert disk["filters"] == ["retry"] and disk["driver"] == "scsi-hd"

    refused = await cli("add", *c, "sh", "script=id")
    assert refused.returncode == 1
    assert refused.stderr.startswith(b"nbd-hotplug: plugin-not-allowed: ")
    as_json = await cli("remove", *c, "nope", "--json")
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["error"]["code"] == "not-found"

    removed = await cli("remove", *c, "c1")
    assert removed.returncode == 0 and removed.stdout == b"c1: removed\n"

    gone = await cli("ping", "--control", str(short_tmp / "nothing.sock"))
    assert gone.returncode == 4 and b"cannot talk to the agent" in gone.stderr
    usage = await cli("add", *c)
    assert usage.returncode == 2


async def test_cli_secret_from_stdin_and_watch(agent: Agent, ctl: ControlClient) -> None:
    # The secret is read from stdin, not the command line; memory takes no
    # password, so the agent refuses it, by name only.
    out = await cli("add", "--control", str(agent.control), "memory", "size=1M",
                    "--secret", "password=-", stdin=b"hunter2\n")
    assert out.returncode == 1 and b"param-not-allowed" in out.stderr
    assert b"hunter2" not in out.stderr + out.stdout

    async with trio.open_nursery() as nursery:
        watch = functools.partial(
            trio.run_process,
            [sys.executable, "-m", "agent", "watch", "--control", str(agent.control)],
            cwd=ROOT, stdout=subprocess.PIPE, check=False)
        proc = await nursery.start(watch)
        assert proc.stdout is not None
        # watch has subscribed once it printed its first line: then add.
        buf = b""
        with trio.fail_after(30):
            while b"\n" not in buf:
                buf += await proc.stdout.receive_some(4096)
            reply = await ctl.call("add", disk="w1", plugin="memory", params={"size": "1M"},
                                   driver="scsi-hd")
            assert reply["ok"], reply
            while b"disk-added disk=w1" not in buf:
                buf += await proc.stdout.receive_some(4096)
        nursery.cancel_scope.cancel()
