"""nbdkit command lines and socket-activated processes.

Two jobs, both about never letting a client's words become something else:

* ``ExportSpec`` / ``check_export`` / ``build_argv``: the plugin and filters
  come from allowlists, parameter keys match a strict pattern, values travel
  only as one ``key=value`` word after ``--`` (so nothing can become an
  option, such as ``--run``), and parameters that run programs are refused.
* ``open_listener`` / ``spawn``: the agent owns the listening Unix socket and
  hands it to every nbdkit incarnation as fd 3 (systemd socket activation,
  nbdkit-service(1)).  A crashed nbdkit can thus be replaced without QEMU
  ever seeing "connection refused": its reconnect waits in the backlog.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import trio

from agent.config import DENIED_PARAMS, SECRET_PARAMS, Config
from agent.errors import BadRequest, FilterNotAllowed, ParamNotAllowed, PluginNotAllowed
from agent.sandbox import Plan

NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")
KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
MAX_VALUE = 4096
MAX_PARAMS = 64
MAX_FILTERS = 16
#: Unix socket paths are limited to 107 bytes (sun_path is 108 with the NUL).
MAX_SOCKET_PATH = 107
#: Environment variables an nbdkit inherits from the agent; nothing else.
ENV_PASSTHROUGH = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR", "http_proxy",
                   "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")

@dataclass(frozen=True)
class FilterSpec:
    name: str
    params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportSpec:
    """What one nbdkit serves.  Filters are listed outermost (client side) first."""

    plugin: str
    params: Mapping[str, str] = field(default_factory=dict)
    filters: tuple[FilterSpec, ...] = ()
    readonly: bool = False


def _check_params(owner: str, plugin: str, params: Mapping[str, str]) -> None:
    denied = DENIED_PARAMS["*"] | DENIED_PARAMS.get(plugin, frozenset())
    for key, value in params.items():
        if not KEY_RE.fullmatch(key):
            raise BadRequest(f"{owner}: parameter name {key!r} is not allowed "
                             f"(letters, digits, '_', '.', '-'; not starting with '-')")
        if key in denied:
            raise ParamNotAllowed(f"{owner}: parameter {key!r} is not allowed for plugin "
                                  f"{plugin!r}", param=key)
        if len(value) > MAX_VALUE:
            raise BadRequest(f"{owner}: value of {key!r} is longer than {MAX_VALUE} characters")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise BadRequest(f"{owner}: value of {key!r} contains control characters")


def check_export(spec: ExportSpec, config: Config) -> None:
    """Refuse anything that is not plainly a data export from an allowed plugin.

    Raises PluginNotAllowed, FilterNotAllowed, ParamNotAllowed or BadRequest.
    """
    if not NAME_RE.fullmatch(spec.plugin) or spec.plugin not in config.allowed_plugins:
        raise PluginNotAllowed(f"plugin {spec.plugin!r} is not allowed; allowed: "
                               f"{', '.join(sorted(config.allowed_plugins))}",
                               plugin=spec.plugin)
    if len(spec.filters) > MAX_FILTERS:
        raise BadRequest(f"at most {MAX_FILTERS} filters")
    names = [f.name for f in spec.filters]
    if len(set(names)) != len(names):
        raise BadRequest("a filter is listed twice")
    total = len(spec.params)
    for flt in spec.filters:
        if not NAME_RE.fullmatch(flt.name) or flt.name not in config.allowed_filters:
            raise FilterNotAllowed(f"filter {flt.name!r} is not allowed; allowed: "
                                   f"{', '.join(sorted(config.allowed_filters))}",
                                   filter=flt.name)
        # Filters and the plugin share one key=value namespace: nbdkit hands
        # keys a filter does not know to the plugin, so every key is checked
        # against the plugin's deny list.
        _check_params(f"filter {flt.name}", spec.plugin, flt.params)
        total += len(flt.params)
    _check_params(f"plugin {spec.plugin}", spec.plugin, spec.params)
    if total > MAX_PARAMS:
        raise BadRequest(f"at most {MAX_PARAMS} parameters in all")


def check_secrets(spec: ExportSpec, secrets: Mapping[str, str]) -> None:
    """Refuse secrets the plugin cannot take through a descriptor.

    Messages name keys, never values.  Raises ParamNotAllowed, BadRequest.
    """
    allowed = SECRET_PARAMS.get(spec.plugin, frozenset())
    for key, value in secrets.items():
        if key not in allowed:
            raise ParamNotAllowed(f"secret {key!r} is not supported by plugin "
                                  f"{spec.plugin!r} (supported: "
                                  f"{', '.join(sorted(allowed)) or 'none'})", param=key)
        if key in spec.params:
            raise BadRequest(f"{key!r} is given both as a parameter and a secret")
        if not value or len(value) > MAX_VALUE or "\0" in value:
            raise BadRequest(f"secret {key!r} must be 1 to {MAX_VALUE} characters, no NUL")


def build_argv(nbdkit: str, spec: ExportSpec, *, filters: list[str] | None = None,
               filter_params: list[str] | None = None) -> list[str]:
    """The nbdkit command line for a checked spec (no socket options: fd 3).

    ``filters``/``filter_params`` are the agent's own (the ip filter), put
    outermost.  Secrets are not here: ``spawn`` adds them as ``key=-FD``.
    """
    argv = [nbdkit, "--foreground"]
    if spec.readonly:
        argv.append("--readonly")
    argv += [f"--filter={name}" for name in (filters or [])]
    argv += [f"--filter={flt.name}" for flt in spec.filters]
    argv += ["--", spec.plugin, *(filter_params or [])]
    for flt in spec.filters:
        argv += [f"{k}={v}" for k, v in flt.params.items()]
    argv += [f"{k}={v}" for k, v in spec.params.items()]
    return argv


def check_socket_path(path: Path) -> None:
    """Raise BadRequest if ``path`` does not fit in sun_path."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise BadRequest(f"socket path {str(path)!r} is longer than {MAX_SOCKET_PATH} bytes; "
                         f"use a shorter runtime directory")


def open_listener(path: Path, backlog: int = 64, *, selinux_label: str | None = None
                  ) -> socket.socket:
    """Bind and listen on a new Unix socket at ``path`` (mode 0600).

    With ``selinux_label``, the socket is created with that SELinux context
    (what nbdkit's --selinux-label does for sockets it makes itself; here the
    agent makes it).  The socket is not inheritable by default; ``spawn``
    passes it explicitly.  Raises OSError (e.g. the path exists).
    """
    check_socket_path(path)
    if selinux_label is None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        # setsockcreatecon(3): the context of the next socket this thread makes.
        attr = Path("/proc/thread-self/attr/sockcreate")
        attr.write_text(selinux_label)
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        finally:
            attr.write_text("")
    try:
        old = os.umask(0o177)
        try:
            sock.bind(os.fspath(path))
        finally:
            os.umask(old)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _child_env() -> dict[str, str]:
    return {k: os.environ[k] for k in ENV_PASSTHROUGH if k in os.environ}


# The keeper is nbdkit's parent for nbdkit's whole life.
#
# nbdkit (seen with Debian's 1.32.5, strace) calls prctl(PR_SET_PDEATHSIG,
# SIGTERM) at start-up, unasked: it dies when the *thread* that forked it
# exits.  trio forks from worker threads that exit after 10 s idle, and the
# agent itself may exit while its disks should keep serving; a keeper, which
# sets no death signal, is that parent instead.  With bubblewrap the keeper
# is bwrap's monitor process (it reports nbdkit's pid on --json-status-fd);
# without, a small bash that reports the same JSON line.  Either exits with
# nbdkit's status (128+N for signal N).
#
# In the sandbox, the start-up shell moves the listener to fd 3, applies the
# resource limits and execs nbdkit with LISTEN_PID set to its own pid ($$:
# exec keeps it), after setpriv has dropped privileges (exec, same pid).
_START = r"""
if [ "$NBDHP_FD" != 3 ]; then exec 3<&"$NBDHP_FD"; eval "exec $NBDHP_FD<&-"; fi
eval "exec $NBDHP_STATUS>&-"
unset NBDHP_FD NBDHP_STATUS
{limits}
LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"
"""

_BASH_KEEPER = r"""
bash -c "$NBDHP_START" nbdkit "$@" </dev/null >/dev/null &
pid=$!
eval "exec $NBDHP_FD<&-"
trap '' INT HUP TERM QUIT
printf '{"child-pid": %d}\n' "$pid" >&"$NBDHP_STATUS"
eval "exec $NBDHP_STATUS>&-"
unset NBDHP_START
wait "$pid"
exit $?
"""


class NbdkitProcess:
    """A running nbdkit (signalled through a pidfd) and its keeper (reaped)."""

    def __init__(self, keeper: trio.Process, pid: int,
                 status: trio.lowlevel.FdStream | None = None) -> None:
        self.keeper = keeper
        self.pid = pid
        # bwrap writes nbdkit's exit code there at the end: keep it open
        # (closing it would SIGPIPE the keeper).
        self._status = status
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = None  # already gone; the keeper reports how

    @property
    def returncode(self) -> int | None:
        """nbdkit's exit status once reaped: >= 0 exit code, < 0 signal."""
        rc = self.keeper.returncode
        if rc is None:
            return None
        return -(rc - 128) if rc > 128 else rc

    def send_signal(self, sig: int) -> None:
        """Signal nbdkit; a no-op once it is gone (pidfd: no pid reuse race)."""
        if self._pidfd is not None and self.keeper.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        """Wait until nbdkit exited and the keeper is reaped; returns returncode."""
        await self.keeper.wait()
        self.close()
        rc = self.returncode
        assert rc is not None
        return rc

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        if self._status is not None:
            self._status.close()
            self._status = None


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _pipe_with(data: bytes) -> int:
    """A pipe already holding ``data`` (small: it must fit the pipe buffer); the read end."""
    rfd, wfd = os.pipe()
    try:
        os.write(wfd, data)
    finally:
        os.close(wfd)
    return rfd


async def _read_child_pid(stream: trio.lowlevel.FdStream) -> int:
    buf = b""
    while b"\n" not in buf:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        buf += chunk
    try:
        return int(json.loads(buf.split(b"\n", 1)[0])["child-pid"])
    except (ValueError, KeyError, TypeError):
        raise OSError(f"nbdkit keeper did not report a pid (got {buf[:200]!r})") from None


async def spawn(argv: list[str], listener: socket.socket, stderr_fd: int, plan: Plan,
                secrets: Mapping[str, str]) -> NbdkitProcess:
    """Start nbdkit, confined as ``plan`` says, on ``listener`` (fd 3).

    Secrets reach nbdkit as ``key=-FD`` through pipes, never through argv or
    the environment.  stdin and stdout are /dev/null; stderr goes to
    ``stderr_fd``.  The keeper gets its own session, so a terminal's Ctrl-C
    reaches only the agent.  The caller must ``wait()`` for the result.
    Raises OSError if the keeper cannot start or does not report nbdkit's pid.
    """
    fd = listener.fileno()
    # The start-up shell moves the listener to fd 3: no other descriptor
    # passed down may have that number.
    hold3 = None if fd == 3 or _is_open(3) else os.open(os.devnull, os.O_RDONLY)
    opened: list[int] = []
    status_r, status_w = os.pipe()
    opened.append(status_w)
    status = trio.lowlevel.FdStream(status_r)
    try:
        fds = {name: _pipe_with(data) for name, data in plan.pipes.items()}
        opened += fds.values()
        words = []
        for key, value in secrets.items():
            rfd = _pipe_with(value.encode())
            opened.append(rfd)
            words.append(f"{key}=-{rfd}")
        fds["STATUS_FD"] = status_w
        prefix = [str(fds[w]) if w in fds else w for w in plan.prefix]
        env = {**_child_env(), "NBDHP_FD": str(fd), "NBDHP_STATUS": str(status_w),
               "NBDHP_START": _START.format(limits=plan.shell)}
        if plan.bwrap:
            command = [*prefix, "bash", "-c", env["NBDHP_START"], "nbdkit", *argv, *words]
        else:
            command = ["bash", "-c", _BASH_KEEPER, "nbdkit-keeper", *prefix, *argv, *words]
        keeper = await trio.lowlevel.open_process(
            command, pass_fds=(fd, *opened), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=stderr_fd, env=env, start_new_session=True)
    except BaseException:
        status.close()
        raise
    finally:
        for o in opened:
            os.close(o)
        if hold3 is not None:
            os.close(hold3)
    try:
        with trio.fail_after(10):
            pid = await _read_child_pid(status)
    except (OSError, trio.TooSlowError):
        with trio.CancelScope(shield=True):
            keeper.kill()
            await keeper.wait()
        status.close()
        raise OSError("nbdkit keeper did not report a pid") from None
    return NbdkitProcess(keeper, pid, status)
