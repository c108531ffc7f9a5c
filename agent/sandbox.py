"""Confinement of each nbdkit: which layers this machine offers, and the wrapper.

Layers, each detected once at start-up (``detect``), applied to every nbdkit
when available, and reported per disk (``Plan.layers``):

* ``uid``: when the agent runs as root, nbdkit runs as a dedicated
  unprivileged user (``setpriv --reuid/--regid --clear-groups``), with every
  capability dropped from all sets;
* ``no_new_privs`` (``setpriv --no-new-privs``): no setuid escalation;
* ``rlimits`` (``ulimit`` in the start-up shell): open files, address space,
  processes, no core dumps;
* ``namespaces`` (bubblewrap): a private mount namespace in which the host is
  not visible except read-only ``/usr`` and ``/etc`` and the paths the plugin
  was given, a private ``/tmp``, private IPC and UTS, a new session, and no
  network at all for plugins that need none;
* ``seccomp``: a filter (classic BPF, built here) that fails with EPERM the
  system calls nbdkit has no business making (ptrace, mount, kexec, bpf,
  module loading, namespaces, ...);
* ``ip_filter``: nbdkit's ip filter answers only QEMU's uid and the agent's;
* ``selinux``: with SELinux enabled and ``selinux_label`` configured, each
  listening socket is created with that context (and nbdkit runs in
  ``selinux_exec_label`` if set, through bubblewrap); unavailable otherwise.
  Not exercised on the machines this was built on (no SELinux there).

The wrapper (bubblewrap, or a plain bash keeper when bubblewrap is missing)
is also nbdkit's parent for its whole life: see ``agent.nbdkit``.
"""

from __future__ import annotations

import os
import platform
import pwd
import shutil
import struct
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent.errors import PathNotAllowed, PermissionDenied, StartupError

log = structlog.get_logger()

LAYERS = ("uid", "no_new_privs", "rlimits", "namespaces", "seccomp", "ip_filter", "selinux")

#: Plugins that talk to the network; every other plugin gets no network.
NETWORK_PLUGINS = frozenset({"curl", "ssh", "nbd"})

#: Parameters naming host paths the plugin reads (bound read-only into the
#: sandbox).  The file plugin's ``file``/``dir`` are bound writable unless
#: the disk is read-only.
PATH_PARAMS: dict[str, frozenset[str]] = {
    "curl": frozenset({"cainfo", "capath", "ssl-cert", "ssl-key", "unix-socket-path"}),
    "ssh": frozenset({"identity", "known-hosts"}),
    "nbd": frozenset({"socket"}),
    "split": frozenset({"file"}),
    "file": frozenset({"file", "dir"}),
}

# x86_64 system call numbers denied by the seccomp layer.
DENIED_SYSCALLS = {
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
    "fsmount": 432, "fspick": 433, "mount_setattr": 442,
    "kexec_load": 246, "kexec_file_load": 320, "reboot": 169,
    "init_module": 175, "finit_module": 313, "delete_module": 176,
    "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
    "unshare": 272, "setns": 308,
    "swapon": 167, "swapoff": 168, "acct": 163, "quotactl": 179,
    "settimeofday": 164, "clock_settime": 227, "adjtimex": 159, "clock_adjtime": 305,
    "sethostname": 170, "setdomainname": 171, "iopl": 172, "ioperm": 173,
    "open_by_handle_at": 304, "name_to_handle_at": 303,
    "add_key": 248, "request_key": 249, "keyctl": 250, "lookup_dcookie": 212,
    "vhangup": 153, "syslog": 103,
}
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO_EPERM = 0x00050000 | 1
_RET_KILL_PROCESS = 0x80000000
_LD_W_ABS, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06


def seccomp_program(denied: Mapping[str, int] = DENIED_SYSCALLS) -> bytes:
    """A classic-BPF seccomp program for x86_64 (``struct sock_filter[]``).

    Other architectures (including the x32 ABI) are killed; ``denied`` system
    calls fail with EPERM; everything else is allowed.
    """
    nrs = sorted(set(denied.values()))
    n = len(nrs)

    def ins(code: int, jt: int, jf: int, k: int) -> bytes:
        return struct.pack("=HBBI", code, jt, jf, k)

    # Layout: 0 ld arch; 1 jeq arch; 2 ld nr; 3 jge x32; 4..4+n-1 jeq nr;
    # 4+n allow; 5+n errno; 6+n kill.
    prog = [ins(_LD_W_ABS, 0, 0, 4),
            ins(_JEQ_K, 0, n + 4, _AUDIT_ARCH_X86_64),
            ins(_LD_W_ABS, 0, 0, 0),
            ins(_JGE_K, n + 1, 0, _X32_SYSCALL_BIT)]
    for i, nr in enumerate(nrs):
        prog.append(ins(_JEQ_K, n - i, 0, nr))
    prog += [ins(_RET_K, 0, 0, _RET_ALLOW), ins(_RET_K, 0, 0, _RET_ERRNO_EPERM),
             ins(_RET_K, 0, 0, _RET_KILL_PROCESS)]
    return b"".join(prog)


@dataclass(frozen=True)
class Limits:
    """Resource limits of each nbdkit (ulimit units: counts and KiB)."""

    nofile: int = 1024
    nproc: int = 4096
    address_space_kib: int = 16 << 20  # 16 GiB of address space
    core: int = 0


@dataclass(frozen=True)
class Policy:
    """What confinement is asked for (part of the agent's Config)."""

    #: user nbdkit runs as when the agent is root; missing -> "nobody"
    run_as: str = "nbd-hotplug"
    limits: Limits = field(default_factory=Limits)
    #: layers whose absence must stop the agent from starting
    required: frozenset[str] = frozenset()
    #: directories the file plugin may serve from (empty: none)
    file_dirs: tuple[Path, ...] = ()
    #: SELinux context of each nbdkit socket, when SELinux is enabled
    selinux_label: str | None = None
    #: SELinux context nbdkit runs in (bwrap --exec-label), when enabled
    selinux_exec_label: str | None = None
    #: turn every layer off (for debugging only)
    disabled: bool = False


@dataclass(frozen=True)
class Host:
    """What this machine offers, found once at start-up."""

    is_root: bool
    user: tuple[int, int] | None  # uid, gid nbdkit runs as (None: the agent's)
    bwrap: str | None
    setpriv: str | None
    seccomp: bool
    selinux: bool
    allowed_uids: tuple[int, ...]  # answered by the ip filter

    def available(self) -> dict[str, bool]:
        return {
            "uid": self.user is not None,
            "no_new_privs": self.setpriv is not None,
            "rlimits": True,
            "namespaces": self.bwrap is not None,
            "seccomp": self.seccomp,
            "ip_filter": bool(self.allowed_uids),
            "selinux": self.selinux,
        }


def _resolve_user(name: str) -> tuple[int, int] | None:
    for candidate in (name, "nobody"):
        try:
            pw = pwd.getpwnam(candidate)
        except KeyError:
            continue
        if candidate != name:
            log.warning("sandbox-user-missing", user=name, using=candidate)
        return pw.pw_uid, pw.pw_gid
    return None


def _bwrap_works(bwrap: str) -> bool:
    """Try a minimal sandbox once: bubblewrap may be installed yet unusable."""
    try:
        subprocess.run([bwrap, "--ro-bind", "/", "/", "--unshare-net", "--unshare-ipc",
                        "--", "true"], check=True, timeout=10,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def detect(policy: Policy, qemu_uid: int | None) -> Host:
    """Find the layers this machine offers; log each missing one once.

    Raises StartupError if a layer listed in ``policy.required`` is missing.
    Blocking (runs bubblewrap once): call it from a thread.
    """
    is_root = os.geteuid() == 0
    if policy.disabled:
        host = Host(is_root, None, None, None, False, False, ())
    else:
        bwrap = shutil.which("bwrap")
        if bwrap is not None and not _bwrap_works(bwrap):
            bwrap = None
        setpriv = shutil.which("setpriv")
        user = _resolve_user(policy.run_as) if is_root and setpriv else None
        uids = sorted({os.geteuid(), *([qemu_uid] if qemu_uid is not None else [])})
        host = Host(
            is_root=is_root,
            user=user,
            bwrap=bwrap,
            setpriv=setpriv,
            seccomp=bwrap is not None and platform.machine() == "x86_64",
            selinux=Path("/sys/fs/selinux/enforce").exists()
            and policy.selinux_label is not None,
            allowed_uids=tuple(uids),
        )
    available = host.available()
    for layer in LAYERS:
        if not available[layer]:
            log.warning("sandbox-layer-unavailable", layer=layer)
    missing = sorted(layer for layer in policy.required if not available.get(layer))
    if missing:
        raise StartupError(f"required sandbox layers unavailable: {', '.join(missing)}")
    return host


@dataclass(frozen=True)
class Plan:
    """How one nbdkit is wrapped."""

    #: argv before the start-up shell (bubblewrap, setpriv), may be empty
    prefix: list[str]
    #: shell commands run in the sandbox just before exec'ing nbdkit
    shell: str
    #: nbdkit filters the agent adds in front of the client's (outermost first)
    filters: list[str]
    #: their key=value parameters
    filter_params: list[str]
    #: data for extra pipes: {placeholder: bytes}; see nbdkit.spawn
    pipes: dict[str, bytes]
    #: True if bubblewrap is the keeper (it reports nbdkit's pid itself)
    bwrap: bool
    layers: dict[str, Any]
    #: SELinux context for the disk's listening socket
    socket_label: str | None = None


_ALWAYS_VISIBLE = ("/usr/", "/etc/")


def _bind_args(paths: Mapping[str, bool]) -> list[str]:
    """Bind each path at its own place; open up the directories bwrap creates.

    bwrap creates the parents of a bound path in the sandbox's tmpfs with
    the host directory's mode (often 0700, root): the sandbox user could not
    reach the file.  Those made-up directories hold nothing else, so they
    are made 0755.
    """
    args: list[str] = []
    parents: set[str] = set()
    for path, writable in sorted(paths.items()):
        if path.startswith(_ALWAYS_VISIBLE) and not writable:
            continue
        args += ["--bind" if writable else "--ro-bind", path, path]
        parent = os.path.dirname(path)
        while parent not in ("/", "/tmp", "") and not (parent + "/").startswith(_ALWAYS_VISIBLE):
            parents.add(parent)
            parent = os.path.dirname(parent)
    for parent in sorted(parents):
        args += ["--chmod", "0755", parent]
    return args


def _root_links() -> list[str]:
    """Mirror /bin, /lib, ... as the host has them (usually symlinks into /usr)."""
    args: list[str] = []
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        p = Path("/") / name
        if p.is_symlink():
            args += ["--symlink", os.readlink(p), str(p)]
        elif p.is_dir():
            args += ["--ro-bind", str(p), str(p)]
    return args


def plan(host: Host, policy: Policy, plugin: str, paths: Mapping[str, bool]) -> Plan:
    """The wrapper for one nbdkit serving ``plugin`` with host ``paths``.

    ``paths`` maps each host path the plugin needs to whether it must be
    writable.  ``STATUS_FD`` and ``SECCOMP_FD`` in the result are placeholders
    that ``nbdkit.spawn`` replaces with real descriptor numbers.
    """
    lim = policy.limits
    shell = (f"ulimit -n {lim.nofile} -u {lim.nproc} -v {lim.address_space_kib} "
             f"-c {lim.core}")
    layers: dict[str, Any] = {name: False for name in LAYERS}
    layers["rlimits"] = {"nofile": lim.nofile, "nproc": lim.nproc,
                         "address_space_kib": lim.address_space_kib, "core": lim.core}
    prefix: list[str] = []
    pipes: dict[str, bytes] = {}
    if host.bwrap:
        network = plugin in NETWORK_PLUGINS
        prefix = [host.bwrap, "--ro-bind", "/usr", "/usr", *_root_links(),
                  "--ro-bind", "/etc", "/etc",
                  "--ro-bind-try", "/run/systemd/resolve", "/run/systemd/resolve",
                  "--proc", "/proc", "--dev", "/dev", "--perms", "01777", "--tmpfs", "/tmp",
                  *_bind_args(paths),
                  "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--new-session",
                  *([] if network else ["--unshare-net"]),
                  "--json-status-fd", "STATUS_FD"]
        namespaces = ["mnt", "ipc", "uts", "cgroup"] + ([] if network else ["net"])
        layers["namespaces"] = {"unshared": namespaces, "network": network,
                                "visible": sorted(paths)}
        if host.seccomp:
            prefix += ["--seccomp", "SECCOMP_FD"]
            pipes["SECCOMP_FD"] = seccomp_program()
            layers["seccomp"] = {"denied": sorted(DENIED_SYSCALLS)}
        if host.selinux and policy.selinux_exec_label:
            prefix += ["--exec-label", policy.selinux_exec_label]
        prefix.append("--")
    if host.setpriv:
        prefix += [host.setpriv, "--no-new-privs"]
        layers["no_new_privs"] = True
        if host.user is not None:
            uid, gid = host.user
            prefix += [f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                       "--inh-caps=-all", "--bounding-set=-all"]
            layers["uid"] = {"uid": uid, "gid": gid}
        prefix.append("--")
    filters: list[str] = []
    filter_params: list[str] = []
    if host.allowed_uids:
        filters = ["ip"]
        filter_params = [f"allow={','.join(f'uid:{u}' for u in host.allowed_uids)}",
                         "deny=all"]
        layers["ip_filter"] = {"allow_uids": list(host.allowed_uids)}
    socket_label = None
    if host.selinux and policy.selinux_label:
        socket_label = policy.selinux_label
        layers["selinux"] = {"socket": socket_label, "process": policy.selinux_exec_label}
    return Plan(prefix, shell, filters, filter_params, pipes, host.bwrap is not None, layers,
                socket_label)


def host_paths(plugin: str, params: Mapping[str, str], readonly: bool,
               file_dirs: tuple[Path, ...]) -> tuple[dict[str, str], dict[str, bool]]:
    """The host paths a plugin is given, resolved, and what must be visible.

    Returns the parameters with path values resolved (symlinks followed, so
    that the sandbox shows exactly what was checked) and a map of paths to
    bind into the sandbox -> writable.  The file plugin may only serve from
    ``file_dirs``.  Raises PathNotAllowed.
    """
    out = dict(params)
    binds: dict[str, bool] = {}
    for key in sorted(PATH_PARAMS.get(plugin, frozenset()) & set(params)):
        resolved = os.path.realpath(params[key])
        if plugin == "file":
            roots = [os.path.realpath(d) for d in file_dirs]
            if not any(os.path.commonpath([resolved, r]) == r for r in roots):
                raise PathNotAllowed(
                    f"{key}={params[key]!r} is outside the directories the file plugin may "
                    f"serve from ({', '.join(map(str, file_dirs)) or 'none configured'})",
                    param=key)
            binds[resolved] = not readonly
        else:
            binds[resolved] = False
        out[key] = resolved
    return out, binds


def check_access(path: str, user: tuple[int, int] | None, write: bool) -> None:
    """Raise PermissionDenied if ``user`` cannot open ``path`` as needed.

    Mode bits only (no ACLs): owner, group, other.
    """
    if user is None:
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return  # nbdkit reports a missing file itself, with its own words
    uid, gid = user
    if st.st_uid == uid:
        bits = (st.st_mode >> 6) & 7
    elif st.st_gid == gid:
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    need = 6 if write else 4
    if bits & need != need:
        raise PermissionDenied(
            f"{path} is not {'writable' if write else 'readable'} by the sandbox user "
            f"(uid {uid}, gid {gid}): chown or chmod it, or set run_as",
            path=path)
