"""Confinement and hostile input, checked from outside the agent.

nbdkit's confinement is read from /proc (status, limits, namespaces, its
root directory); what it can reach is tried from inside its own network
namespace; hostile requests are thrown at a live agent, which must refuse
each one with its code, start nothing, and keep serving.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import sandbox
from agent.client import ControlClient
from tests.conftest import Agent, SpawnAgent, error_code, make_image, ok, sandbox_user

pytestmark = pytest.mark.e2e
ROOT = os.geteuid() == 0


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _limits(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        out[line[:26].strip()] = line[26:47].strip()
    return out


def _ns(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


@pytest.mark.skipif(not ROOT, reason="the uid layer needs the agent to run as root")
async def test_file_nbdkit_is_confined(agent: Agent, ctl: ControlClient, short_tmp: Path) -> None:
    image = make_image(short_tmp / "disk.img")
    (short_tmp / "neighbour.img").write_bytes(b"secret neighbour")
    res = ok(await ctl.call("add", disk="box", plugin="file", params={"file": str(image)},
                            driver="scsi-hd"))
    pid = res["pid"]
    st = _status(pid)
    uid, gid = sandbox_user()
    assert st["Uid"].split() == [str(uid)] * 4 and st["Gid"].split() == [str(gid)] * 4
    assert st["Groups"] == ""
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"
    assert int(st["CapEff"], 16) == 0 and int(st["CapBnd"], 16) == 0
    assert int(st["CapPrm"], 16) == 0 and int(st["CapInh"], 16) == 0

    lim = _limits(pid)
    assert lim["Max open files"] == "1024"
    assert lim["Max core file size"] == "0"
    assert lim["Max processes"] == "4096"
    assert lim["Max address space"] == str(16 << 30)

    for kind in ("mnt", "net", "ipc", "uts"):
        assert _ns(pid, kind) != _ns("self", kind), kind
    # Its file system: the image, read-only system dirs, nothing else.
    root = Path(f"/proc/{pid}/root")
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["bin", "dev", "etc", "lib", "lib64", "proc", "sbin", "tmp", "usr", "run"]
        if (root / "run").exists() else
        ["bin", "dev", "etc", "lib", "lib64", "proc", "sbin", "tmp", "usr"])
    assert (root / str(image).lstrip("/")).exists()
    assert not (root / str(short_tmp / "neighbour.img").lstrip("/")).exists()
    assert not (root / "root").exists() and not (root / "home").exists()
    layers = res["sandbox"]
    assert layers["uid"] == {"uid": uid, "gid": gid}
    assert layers["seccomp"] and layers["no_new_privs"] and layers["ip_filter"]
    assert "net" in layers["namespaces"]["unshared"]


@pytest.mark.skipif(not ROOT, reason="nsenter needs root")
async def test_no_network_for_file_plugin(agent: Agent, ctl: ControlClient,
                                          short_tmp: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        image = make_image(short_tmp / "disk.img")
        res = ok(await ctl.call("add", disk="nonet", plugin="file",
                                params={"file": str(image)}, driver="scsi-hd"))
        probe = f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected"
        outside = await trio.run_process(["bash", "-c", probe], capture_stdout=True,
                                         capture_stderr=True, check=False)
        assert outside.stdout.strip() == b"connected"
        inside = await trio.run_process(
            ["nsenter", f"--net=/proc/{res['pid']}/ns/net", "bash", "-c", probe],
            capture_stdout=True, capture_stderr=True, check=False)
        assert inside.returncode != 0 and b"connected" not in inside.stdout
        assert b"unreachable" in inside.stderr.lower() or b"refused" in inside.stderr.lower()
    finally:
        listener.close()


async def test_seccomp_program_denies_and_allows(short_tmp: Path) -> None:
    """The filter itself, loaded by bubblewrap around a shell."""
    bwrap = sandbox.shutil.which("bwrap")
    if bwrap is None or not sandbox._bwrap_works(bwrap):
        pytest.skip("bubblewrap unavailable")
    prog = short_tmp / "seccomp.bpf"
    prog.write_bytes(sandbox.seccomp_program())

    async def run(cmd: str) -> subprocess.CompletedProcess[bytes]:
        fd = os.open(prog, os.O_RDONLY)
        try:
            return await trio.run_process(
                [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--seccomp", str(fd),
                 "--", "bash", "-c", cmd], pass_fds=(fd,), capture_stdout=True,
                capture_stderr=True, check=False)
        finally:
            os.close(fd)

    allowed = await run("echo fine; cat /proc/self/status | grep ^Seccomp:")
    assert allowed.returncode == 0 and b"fine" in allowed.stdout
    assert b"Seccomp:\t2" in allowed.stdout
    for cmd in ("unshare --user true", "mount -t tmpfs none /tmp",
                "python3 -c 'import ctypes,sys; "
                "sys.exit(ctypes.CDLL(None).ptrace(0,0,0,0) == -1)'"):
        denied = await run(cmd)
        assert denied.returncode != 0, (cmd, denied)


@pytest.mark.skipif(not ROOT, reason="needs another uid to connect as")
async def test_ip_filter_answers_only_allowed_uids(agent: Agent, ctl: ControlClient) -> None:
    res = ok(await ctl.call("add", disk="ipf", plugin="memory", params={"size": "1M"},
                            driver="scsi-hd"))
    sock = Path(res["socket"])
    uri = f"nbd+unix:///?socket={sock}"
    as_root = await trio.run_process(["nbdinfo", "--size", uri], capture_stdout=True,
                                     check=False)
    assert as_root.returncode == 0 and as_root.stdout.strip() == b"1048576"
    # Let a stranger reach the socket file: only nbdkit's ip filter stands.
    agent.runtime_dir.chmod(0o711)
    sock.chmod(0o666)
    stranger = await trio.run_process(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         "nbdinfo", "--size", uri], capture_stdout=True, capture_stderr=True, check=False)
    assert stranger.returncode != 0, stranger


async def test_hostile_requests_start_nothing(agent: Agent, ctl: ControlClient,
                                              short_tmp: Path) -> None:
    image = make_image(short_tmp / "disk.img")
    hostile: list[tuple[dict[str, Any], str]] = [
        ({"plugin": "memory", "params": {"--run": "id"}}, "bad-request"),
        ({"plugin": "memory", "params": {"-U": "/tmp/x"}}, "bad-request"),
        ({"plugin": "memory", "params": {"size=1M --run": "id"}}, "bad-request"),
        ({"plugin": "memory", "params": {"size": "1M\n--run=id"}}, "bad-request"),
        ({"plugin": "memory", "params": {"size": "1M\x00"}}, "bad-request"),
        ({"plugin": "memory", "params": {"size": "\u202e1M"}}, "nbdkit-failed"),
        ({"plugin": "--run=id"}, "plugin-not-allowed"),
        ({"plugin": "sh", "params": {"script": "id"}}, "plugin-not-allowed"),
        ({"plugin": "eval", "params": {"open": "id"}}, "plugin-not-allowed"),
        ({"plugin": "python", "params": {"script": "/tmp/x.py"}}, "plugin-not-allowed"),
        ({"plugin": "memory", "params": {"size": "1M"}, "filters": ["exitwhen"]},
         "filter-not-allowed"),
        ({"plugin": "nbd", "params": {"socket": "/x"},
          "filters": [{"name": "retry", "params": {"command": "id"}}]}, "param-not-allowed"),
        ({"plugin": "nbd", "params": {"command": "id"}}, "param-not-allowed"),
        ({"plugin": "curl", "params": {"url": "http://x", "header-script": "id"}},
         "param-not-allowed"),
        ({"plugin": "curl", "params": {"url": "http://x", "password": "+/etc/shadow"}},
         "param-not-allowed"),
        ({"plugin": "memory", "params": {"size": "1M", "allow": "all"}}, "param-not-allowed"),
        ({"plugin": "file", "params": {"file": "/etc/passwd"}}, "path-not-allowed"),
        ({"plugin": "file", "params": {"file": f"{short_tmp}/../../etc/passwd"}},
         "path-not-allowed"),
        ({"plugin": "file", "params": {"file": str(image)}, "secrets": {"password": "x"}},
         "param-not-allowed"),
        ({"plugin": "file", "params": {"file": str(image)}, "disk": "../x"}, "bad-request"),
        ({"plugin": "file", "params": {"file": str(image)}, "disk": "é"}, "bad-request"),
    ]
    for fields, code in hostile:
        reply = await ctl.call("add", **fields)
        assert error_code(reply) == code, (fields, reply)
        assert agent.descendants() == set(), fields
    # A link inside the allowed dir pointing outside is resolved, then refused.
    (short_tmp / "link.img").symlink_to("/etc/passwd")
    assert error_code(await ctl.call("add", plugin="file",
                                     params={"file": str(short_tmp / "link.img")})) \
        == "path-not-allowed"
    ok(await ctl.call("ping"))
    assert ok(await ctl.call("list")) == {"disks": []}


def _fuzz(path: Path) -> None:
    """Arbitrary lines at the control socket: every complete line gets a reply."""
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
        | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(["op", "id", "disk", "plugin", "params",
                                           "filters", "secrets", "x"]) | st.text(max_size=5),
                          inner, max_size=5),
        max_leaves=12)
    ops = st.sampled_from(["ping", "list", "add", "remove", "restart", "subscribe", "nope"])
    requests = st.fixed_dictionaries({"op": ops}, optional={
        "id": st.integers() | st.text(max_size=5) | st.none(),
        "disk": st.text(max_size=25), "plugin": st.text(max_size=10) | st.integers(),
        "params": json_values, "filters": json_values, "secrets": json_values})
    line = (json_values.map(lambda v: json.dumps(v).encode())
            | requests.map(lambda v: json.dumps(v).encode())
            | st.binary(max_size=200).map(lambda b: b.replace(b"\n", b" ")))

    @settings(max_examples=600, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(line, min_size=1, max_size=8))
    def check(lines: list[bytes]) -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(20)
            s.connect(str(path))
            s.sendall(b"".join(x + b"\n" for x in lines))
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        replies = [json.loads(x) for x in data.splitlines()]
        expected = sum(1 for x in lines if x.strip())
        answers = [r for r in replies if "ok" in r]
        assert len(answers) == expected, (lines, replies)

    check()


async def test_fuzz_control_socket(agent: Agent, ctl: ControlClient) -> None:
    await trio.to_thread.run_sync(_fuzz, agent.control)
    assert agent.proc.returncode is None
    ok(await ctl.call("ping"))
    # Whatever the fuzzer managed to add (e.g. a valid memory disk), remove it;
    # then nothing of it may remain.
    for disk in ok(await ctl.call("list"))["disks"]:
        ok(await ctl.call("remove", disk=disk["disk"]))
    assert agent.descendants() == set()
    assert list(agent.runtime_dir.iterdir()) == []


class _AuthRangeHandler(BaseHTTPRequestHandler):
    """HTTP Basic auth and Range: just what nbdkit's curl plugin needs."""

    data = b""
    expected_auth = ""
    seen_auth: ClassVar[list[str]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _check(self) -> bool:
        auth = self.headers.get("Authorization", "")
        self.seen_auth.append(auth)
        if auth != self.expected_auth:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="x"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return False
        return True

    def do_HEAD(self) -> None:
        if self._check():
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.data)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()

    def do_GET(self) -> None:
        if not self._check():
            return
        start, end = 0, len(self.data) - 1
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start, end = int(a), min(int(b) if b else end, end)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(self.data)}")
        else:
            self.send_response(200)
        body = self.data[start:end + 1]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def _http_server(data: bytes, user: str, password: str) -> Iterator[int]:
    handler = type("H", (_AuthRangeHandler,), {
        "data": data, "seen_auth": [],
        "expected_auth": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_secret_is_visible_nowhere(agent: Agent, ctl: ControlClient,
                                         short_tmp: Path) -> None:
    secret = "S3cr3t-" + secrets.token_hex(8)
    data = bytes(range(256)) * 4096  # 1 MiB
    ok(await ctl.call("subscribe"))
    with _http_server(data, "alice", secret) as port:
        res = ok(await ctl.call(
            "add", disk="auth", plugin="curl", readonly=True, driver="scsi-hd",
            params={"url": f"http://127.0.0.1:{port}/disk.img", "user": "alice"},
            secrets={"password": secret}))
        assert res["size"] == len(data)  # nbdkit authenticated: the secret arrived
        os.kill(res["pid"], 9)  # the secret must survive a restart
        with trio.fail_after(20):
            while (ev := await ctl.next_event())["event"] != "disk-recovered":
                pass
        [disk] = ok(await ctl.call("list"))["disks"]
        assert disk["state"] == "running"
        replies = json.dumps([res, disk, ev])
        wrong = await ctl.call("add", disk="auth2", plugin="curl",
                               params={"url": f"http://127.0.0.1:{port}/disk.img",
                                       "user": "alice"},
                               secrets={"password": secret + "x"})
        assert error_code(wrong) == "nbdkit-failed"
        replies += json.dumps(wrong)
        procs = agent.descendants() | {agent.proc.pid}
        leaks = []
        for pid in procs:
            for name in ("cmdline", "environ"):
                try:
                    if secret.encode() in Path(f"/proc/{pid}/{name}").read_bytes():
                        leaks.append((pid, name))
                except OSError:
                    pass
        assert leaks == []
        assert secret not in replies
        assert secret not in json.dumps(agent.logs)
        for path in agent.runtime_dir.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes()
        ok(await ctl.call("remove", disk="auth"))


# A refused peer gets its reply without asking, and may find the connection
# closed when it sends: tolerate that, then read.
_PING = ("import socket,sys\ns=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
         "try: s.sendall(b'{\"op\":\"ping\"}\\n')\nexcept OSError: pass\n"
         "print(s.recv(4096).decode())")


@pytest.mark.skipif(not ROOT or not Path("/usr/bin/python3").exists(),
                    reason="needs root to act as other uids")
async def test_control_socket_checks_peer_uid(qemu: Any, short_tmp: Path,
                                              spawn_agent: SpawnAgent) -> None:
    cfg = short_tmp / "agent.toml"
    cfg.write_text("allowed_uids = [4242]\n")
    short_tmp.chmod(0o755)
    agent = await spawn_agent(qemu, "--config", str(cfg))
    assert oct(agent.control.stat().st_mode & 0o777) == "0o666"

    async def ping_as(uid: int) -> dict[str, Any]:
        out = await trio.run_process(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
             "/usr/bin/python3", "-c", _PING, str(agent.control)],
            capture_stdout=True, capture_stderr=True)
        reply: dict[str, Any] = json.loads(out.stdout)
        return reply

    assert ok(await ping_as(4242))["version"]
    refused = await ping_as(65534)
    assert error_code(refused) == "permission-denied"
    logged = await agent.wait_log("control-peer-refused")
    assert logged["peer_uid"] == 65534
    assert await agent.stop() == 0


def _flood(path: Path, seconds: float) -> int:
    """Send ping lines without ever reading a reply; returns bytes accepted."""
    line = b'{"op": "ping", "id": "flood"}\n' * 1000
    sent = 0
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        s.settimeout(seconds)
        try:
            while True:
                sent += s.send(line)
        except TimeoutError:
            pass
    return sent


async def test_client_that_never_reads_is_throttled(agent: Agent, ctl: ControlClient) -> None:
    before = int(_status(agent.proc.pid)["VmRSS"].split()[0])
    sent = await trio.to_thread.run_sync(_flood, agent.control, 2.0)
    after = int(_status(agent.proc.pid)["VmRSS"].split()[0])
    # The agent stopped reading once replies backed up: the flood stalled at
    # a few socket buffers, and memory did not follow it.
    assert sent < 32 << 20, sent
    assert after - before < 16 << 10, (before, after)
    ok(await ctl.call("ping"))
