"""Unit tests of the confinement plan (the real thing is in test_e2e_sandbox.py)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from agent import sandbox
from agent.errors import PathNotAllowed, PermissionDenied

HOST = sandbox.Host(is_root=True, user=(999, 995), bwrap="/usr/bin/bwrap",
                    setpriv="/usr/bin/setpriv", seccomp=True, selinux=False,
                    allowed_uids=(0, 107))


def test_seccomp_program_shape() -> None:
    prog = sandbox.seccomp_program({"ptrace": 101, "mount": 165})
    ins = [struct.unpack("=HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
    assert len(ins) == 4 + 2 + 3
    assert ins[0] == (0x20, 0, 0, 4)  # load arch
    assert ins[1][3] == 0xC000003E  # x86_64, else jump to kill
    assert ins[1][2] == len(ins) - 1 - 2  # jf lands on the kill
    assert [i[3] for i in ins[4:6]] == [101, 165]
    # every denied number jumps to the errno return
    for k, (_, jt, _, _) in enumerate(ins[4:6]):
        assert 4 + k + 1 + jt == len(ins) - 2
    assert ins[-3][3] == 0x7FFF0000 and ins[-2][3] == 0x00050001 and ins[-1][3] == 0x80000000


def test_plan_with_every_layer(tmp_path: Path) -> None:
    plan = sandbox.plan(HOST, sandbox.Policy(), "file", {str(tmp_path / "a.img"): True})
    assert plan.prefix[0] == "/usr/bin/bwrap" and plan.bwrap
    assert "--unshare-net" in plan.prefix and "--seccomp" in plan.prefix
    i = plan.prefix.index("--bind")
    assert plan.prefix[i + 1:i + 3] == [str(tmp_path / "a.img")] * 2
    assert "--reuid=999" in plan.prefix and "--no-new-privs" in plan.prefix
    assert plan.filters == ["ip"] and plan.filter_params == ["allow=uid:0,uid:107", "deny=all"]
    assert "SECCOMP_FD" in plan.pipes
    assert plan.layers["uid"] == {"uid": 999, "gid": 995}
    assert plan.layers["selinux"] is False


def test_network_plugins_keep_the_network() -> None:
    plan = sandbox.plan(HOST, sandbox.Policy(), "curl", {})
    assert "--unshare-net" not in plan.prefix
    assert plan.layers["namespaces"]["network"] is True


def test_plan_without_bwrap_or_root() -> None:
    host = sandbox.Host(False, None, None, "/usr/bin/setpriv", False, False, (1000,))
    plan = sandbox.plan(host, sandbox.Policy(), "memory", {})
    assert plan.prefix == ["/usr/bin/setpriv", "--no-new-privs", "--"]
    assert not plan.bwrap and plan.layers["namespaces"] is False and plan.layers["uid"] is False
    assert "ulimit -n 1024" in plan.shell


def test_host_paths_resolve_and_restrict(tmp_path: Path) -> None:
    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "a.img").write_bytes(b"")
    (allowed / "link.img").symlink_to("/etc/passwd")
    params, binds = sandbox.host_paths("file", {"file": str(allowed / "x/../a.img")}, False,
                                       (allowed,))
    assert params["file"] == str(allowed / "a.img") and binds == {str(allowed / "a.img"): True}
    _, binds = sandbox.host_paths("file", {"file": str(allowed / "a.img")}, True, (allowed,))
    assert binds == {str(allowed / "a.img"): False}
    for bad in (allowed / "link.img", tmp_path / "other.img", Path("/etc/passwd")):
        with pytest.raises(PathNotAllowed):
            sandbox.host_paths("file", {"file": str(bad)}, False, (allowed,))
    with pytest.raises(PathNotAllowed):
        sandbox.host_paths("file", {"file": str(allowed / "a.img")}, False, ())
    # other plugins' paths are bound read-only, wherever they are
    _, binds = sandbox.host_paths("curl", {"cainfo": "/srv/ca.pem", "url": "x"}, False, ())
    assert binds == {"/srv/ca.pem": False}


def test_check_access_mode_bits(tmp_path: Path) -> None:
    f = tmp_path / "img"
    f.write_bytes(b"")
    st = f.stat()
    f.chmod(0o644)
    sandbox.check_access(str(f), (st.st_uid, st.st_gid), write=True)  # owner rw
    sandbox.check_access(str(f), (st.st_uid + 1, st.st_gid + 1), write=False)  # other r
    with pytest.raises(PermissionDenied):
        sandbox.check_access(str(f), (st.st_uid + 1, st.st_gid + 1), write=True)
    f.chmod(0o640)
    sandbox.check_access(str(f), (st.st_uid + 1, st.st_gid), write=False)  # group r
    with pytest.raises(PermissionDenied):
        sandbox.check_access(str(f), (st.st_uid + 1, st.st_gid + 1), write=False)
    sandbox.check_access(str(f), None, write=True)  # no uid switch: nothing to check

