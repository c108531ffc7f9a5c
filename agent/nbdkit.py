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
import os
import re
import signal
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import trio

from agent.config import DENIED_PARAMS, Config
from agent.errors import BadRequest, FilterNotAllowed, ParamNotAllowed, PluginNotAllowed

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


def build_argv(nbdkit: str, spec: ExportSpec) -> list[str]:
    """The nbdkit command line for a checked spec (no socket options: fd 3)."""
    argv = [nbdkit, "--foreground"]
    if spec.readonly:
        argv.append("--readonly")
    argv += [f"--filter={flt.name}" for flt in spec.filters]
    argv += ["--", spec.plugin]
    for flt in spec.filters:
        argv += [f"{k}={v}" for k, v in flt.params.items()]
    argv += [f"{k}={v}" for k, v in spec.params.items()]
    return argv


def check_socket_path(path: Path) -> None:
    """Raise BadRequest if ``path`` does not fit in sun_path."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise BadRequest(f"socket path {str(path)!r} is longer than {MAX_SOCKET_PATH} bytes; "
                         f"use a shorter runtime directory")


def open_listener(path: Path, backlog: int = 64) -> socket.socket:
    """Bind and listen on a new Unix socket at ``path`` (mode 0600).

    The socket is not inheritable by default; ``spawn`` passes it explicitly.
    Raises OSError (e.g. the path exists).
    """
    check_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
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


# The keeper: a bash that starts nbdkit as its own child and waits for it.
#
# nbdkit (seen with Debian's 1.32.5, strace) calls prctl(PR_SET_PDEATHSIG,
# SIGTERM) at start-up, unasked: it dies when the *thread* that forked it
# exits.  trio forks from a worker thread that exits after 10 s idle, and the
# agent itself may exit while its disks should keep serving; a keeper
# process, which sets no death signal, is that parent instead.  The
# keeper moves the listener to fd 3, sets LISTEN_PID to nbdkit's own pid
# ($BASHPID of the subshell that execs it), reports that pid on stdout,
# ignores terminal signals, and exits with nbdkit's status (128+N for
# signal N).
_KEEPER = r"""
if [ "$NBDHP_FD" != 3 ]; then exec 3<&"$NBDHP_FD"; eval "exec $NBDHP_FD<&-"; fi
unset NBDHP_FD
( LISTEN_PID=$BASHPID LISTEN_FDS=1 exec "$@" ) </dev/null >/dev/null &
pid=$!
exec 3<&-
trap '' INT HUP TERM QUIT
echo "$pid"
exec >&-
wait "$pid"
exit $?
"""


class NbdkitProcess:
    """A running nbdkit (signalled through a pidfd) and its keeper (reaped)."""

    def __init__(self, keeper: trio.Process, pid: int) -> None:
        self.keeper = keeper
        self.pid = pid
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


async def spawn(argv: list[str], listener: socket.socket, stderr_fd: int) -> NbdkitProcess:
    """Start nbdkit with ``listener`` as its activated socket (fd 3).

    stdin and stdout are /dev/null (nbdkit exits if they are closed); stderr
    goes to ``stderr_fd``.  The keeper gets its own session, so a terminal's
    Ctrl-C reaches only the agent.  The caller must ``wait()`` for the
    result.  Raises OSError if the keeper cannot start.
    """
    fd = listener.fileno()
    keeper = await trio.lowlevel.open_process(
        ["bash", "-c", _KEEPER, "nbdkit-keeper", *argv],
        pass_fds=(fd,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr_fd,
        env={**_child_env(), "NBDHP_FD": str(fd)},
        start_new_session=True,
    )
    assert keeper.stdout is not None
    out = b""
    async with keeper.stdout:
        while chunk := await keeper.stdout.receive_some(64):
            out += chunk
    try:
        pid = int(out)
    except ValueError:
        with trio.CancelScope(shield=True):
            keeper.kill()
            await keeper.wait()
        raise OSError(f"nbdkit keeper did not report a pid (got {out!r})") from None
    return NbdkitProcess(keeper, pid)
