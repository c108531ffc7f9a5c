"""Frozen configuration: daemon settings, restart policy, allowlists.

Everything has a sensible default; ``load_config`` reads an optional TOML file
(see ``config/nbd-hotplug.toml``) and the CLI overrides single values.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import StartupError
from agent.sandbox import Limits, Policy

#: Plugins that serve data and run no user-supplied code.  Plugins that
#: execute code (sh, eval, cc, python, perl, lua, ruby, tcl, ocaml, golang,
#: rust, ...) or spawn programs named by a parameter (iso, tmpdisk, ondemand,
#: cdi, linuxdisk, ...) are not here, so they are refused.
DEFAULT_PLUGINS = frozenset({
    "curl", "ssh", "nbd", "file", "split", "memory", "null", "zero",
    "pattern", "random", "sparse-random", "full", "data",
})

#: Filters that take no path to write and run no program.
DEFAULT_FILTERS = frozenset({
    "blocksize", "blocksize-policy", "cache", "cacheextents", "checkwrite",
    "cow", "delay", "fua", "limit", "multi-conn", "nocache", "noextents",
    "noparallel", "nozero", "offset", "partition", "protect", "readahead",
    "retry", "retry-request", "swab", "truncate",
})

#: Parameters refused even for allowed plugins: they run programs, read
#: arbitrary files into the request, or inject file descriptors.  Secrets
#: (passwords, cookies) never travel as parameters.
DENIED_PARAMS: dict[str, frozenset[str]] = {
    # allow/deny belong to the agent's own ip filter
    "*": frozenset({"password", "proxy-password", "cookie", "socket-fd", "allow", "deny"}),
    "curl": frozenset({"header-script", "cookie-script", "header-script-renew",
                       "cookie-script-renew", "cookiejar"}),
    "nbd": frozenset({"command", "arg"}),
    "ssh": frozenset({"config"}),
}


#: Parameters that may only be given as ``secrets`` (they reach nbdkit as
#: ``key=-FD``, read from a pipe).
SECRET_PARAMS: dict[str, frozenset[str]] = {
    "curl": frozenset({"password", "proxy-password", "cookie"}),
    "ssh": frozenset({"password"}),
}


@dataclass(frozen=True)
class RestartPolicy:
    """How a crashed nbdkit is restarted and when a disk is given up.

    An exit counts as a *failure* when nbdkit never became ready, or stayed
    ready less than ``min_uptime`` seconds.  The first failure is retried at
    once (the common case, a one-off crash, must be fast); later consecutive
    failures back off exponentially.  ``max_failures`` failures within
    ``window`` seconds put the disk in state ``failed``.
    """

    max_failures: int = 5
    window: float = 60.0
    min_uptime: float = 1.0
    backoff_initial: float = 0.25
    backoff_max: float = 8.0

    def backoff(self, consecutive_failures: int) -> float:
        """Delay before the next start after ``consecutive_failures`` failures."""
        if consecutive_failures <= 1:
            return 0.0
        return float(min(self.backoff_max,
                         self.backoff_initial * 2.0 ** (consecutive_failures - 2)))


@dataclass(frozen=True)
class Config:
    """Settings of one agent process."""

    qmp_path: Path
    control_path: Path
    runtime_dir: Path
    nbdkit: str = "nbdkit"
    allowed_plugins: frozenset[str] = DEFAULT_PLUGINS
    allowed_filters: frozenset[str] = DEFAULT_FILTERS
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    sandbox: Policy = field(default_factory=Policy)
    #: seconds for nbdkit to answer a first NBD handshake
    ready_timeout: float = 10.0
    #: seconds between health probes of a running nbdkit (0 disables)
    health_interval: float = 5.0
    #: seconds a health probe may take before nbdkit is declared wedged
    health_timeout: float = 3.0
    #: SIGTERM-to-SIGKILL grace when stopping nbdkit
    stop_grace: float = 5.0
    #: deadline for one QMP command
    qmp_timeout: float = 30.0
    #: deadline for the guest to release a device after device_del
    unplug_timeout: float = 15.0
    #: default reconnect-delay (s) of the nbd block node: how long QEMU holds
    #: guest I/O while nbdkit is being replaced before failing it with EIO
    reconnect_delay: int = 30
    #: largest control line accepted, in bytes
    max_line: int = 1 << 20
    #: requests one connection may have in flight
    max_inflight: int = 16
    #: control connections served at once
    max_connections: int = 64
    #: besides the agent's own uid and root: uids and gids (primary or
    #: supplementary) whose processes may use the control socket (SO_PEERCRED)
    allowed_uids: frozenset[int] = frozenset()
    allowed_gids: frozenset[int] = frozenset()
    log_level: str = "info"


_SIMPLE = {f.name: f for f in dataclasses.fields(Config)}


def load_config(path: Path | None, **overrides: Any) -> Config:
    """Build a Config from an optional TOML file plus non-None overrides.

    Raises StartupError on an unreadable file, unknown keys or bad types.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as f:
                values = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise StartupError(f"cannot read config {path}: {err}") from err
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(values) - set(_SIMPLE) - {"file_dirs", "run_as"}
    if unknown:
        raise StartupError(f"unknown config keys: {', '.join(sorted(unknown))}")
    file_dirs = values.pop("file_dirs", None)
    try:
        if "restart" in values and isinstance(values["restart"], dict):
            values["restart"] = RestartPolicy(**values["restart"])
        box = dict(values.get("sandbox") or {})
        if isinstance(box.get("limits"), dict):
            box["limits"] = Limits(**box["limits"])
        box["file_dirs"] = tuple(Path(d) for d in [*box.get("file_dirs", ()),
                                                    *(file_dirs or ())])
        box["required"] = frozenset(box.get("required", ()))
        if "run_as" in values:
            box["run_as"] = values.pop("run_as")
        values["sandbox"] = Policy(**box)
        for key in ("allowed_plugins", "allowed_filters", "allowed_uids", "allowed_gids"):
            if key in values:
                values[key] = frozenset(values[key])
        for key in ("qmp_path", "control_path", "runtime_dir"):
            if key in values:
                values[key] = Path(values[key])
        return Config(**values)
    except TypeError as err:
        raise StartupError(f"bad config: {err}") from err


def default_base_dir() -> Path:
    """/run/nbd-hotplug for root, else $XDG_RUNTIME_DIR/nbd-hotplug (or /tmp)."""
    if os.geteuid() == 0:
        return Path("/run/nbd-hotplug")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "nbd-hotplug" if xdg else Path(f"/tmp/nbd-hotplug-{os.getuid()}")


def default_runtime_dir(control_path: Path) -> Path:
    """One private dir per agent, named after its control socket."""
    return control_path.parent / f"{control_path.stem}.d"
