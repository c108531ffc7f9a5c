"""The daemon: wires the actors in one nursery and owns the disk table.

Data flows one way: a control request (``agent.server``) calls an op here;
the op drives the disk's supervisor (``agent.supervisor``) and the QEMU
steps (``agent.hotplug``); events flow back out to subscribers.  QMP events
are read here too and turned into disk events.

Exit paths:

* SIGTERM/SIGINT: stop serving; attached disks stay attached and their
  nbdkit keeps serving (detached: no longer supervised).
* The QMP connection drops (QEMU exited): every nbdkit is stopped and
  reaped, every socket removed, and ``QemuGone`` is raised.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from secrets import token_hex
from typing import Any

import structlog
import trio

from agent import __version__, protocol, sandbox
from agent.config import Config
from agent.errors import AgentError, Busy, Exists, InvalidState, NotFound, UnplugTimeout
from agent.hotplug import Attachment, Hotplug
from agent.nbdkit import (
    ExportSpec,
    FilterSpec,
    build_argv,
    check_export,
    check_secrets,
    check_socket_path,
)
from agent.protocol import AddArgs, RemoveArgs, RestartArgs
from agent.qmp import QmpConnection
from agent.supervisor import ProcState, Supervisor

log = structlog.get_logger()

#: Delays (s) before each attempt to resume a VM paused by one of our disks.
RESUME_DELAYS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6)


class QemuGone(Exception):
    """QEMU closed the QMP connection (it exited, or the monitor went away)."""


class Phase(enum.Enum):
    ADDING = "adding"
    ATTACHED = "attached"
    REMOVING = "removing"


@dataclass(eq=False)
class Disk:
    id: str
    spec: ExportSpec
    args: AddArgs
    supervisor: Supervisor
    phase: Phase = Phase.ADDING
    attachment: Attachment | None = None
    created: float = field(default_factory=time.time)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    stopped: trio.Event = field(default_factory=trio.Event)
    device_gone: trio.Event = field(default_factory=trio.Event)
    lock: trio.Lock = field(default_factory=trio.Lock)
    task_started: bool = False
    #: QEMU paused the VM on an I/O error of this disk (werror/rerror=stop)
    paused_vm: bool = False
    #: supervisor.restarts when the agent last resumed the VM for this disk
    resumed_at: int = 0

    @property
    def state(self) -> str:
        if self.phase is Phase.ATTACHED:
            return str(self.supervisor.state.value)
        return str(self.phase.value)

    def to_wire(self) -> dict[str, Any]:
        sup = self.supervisor
        att = self.attachment
        return {
            "disk": self.id,
            "plugin": self.spec.plugin,
            "filters": [f.name for f in self.spec.filters],
            "state": self.state,
            "pid": sup.pid,
            "node": att.node if att else None,
            "device": att.device if att else None,
            "bus": att.bus if att else None,
            "driver": self.args.driver,
            "readonly": self.spec.readonly,
            "socket": str(sup.socket_path),
            "size": sup.size,
            "restarts": sup.restarts,
            "last_exit": sup.last_exit.to_wire() if sup.last_exit else None,
            "last_error": sup.last_error,
            "sandbox": sup.plan.layers,
        }


Subscriber = Callable[[dict[str, Any]], None]


class Daemon:
    """The agent's state and operations on one QEMU."""

    def __init__(self, config: Config, qmp: QmpConnection, host: sandbox.Host) -> None:
        self.config = config
        self.qmp = qmp
        self.host = host
        self.hotplug = Hotplug(qmp)
        self.disks: dict[str, Disk] = {}
        self.subscribers: set[Subscriber] = set()
        self._nursery: trio.Nursery | None = None

    # -- events ---------------------------------------------------------------

    def emit(self, name: str, disk: str | None, **fields: Any) -> None:
        """Send an event to every subscriber (never blocks)."""
        ev = protocol.event(name, disk, **fields)
        for sub in list(self.subscribers):
            sub(ev)
        if name == "disk-recovered" and disk in self.disks and self.disks[disk].paused_vm:
            assert self._nursery is not None
            self._nursery.start_soon(self._resume_vm, self.disks[disk])

    # -- main -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled or QEMU goes away (raises QemuGone)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._pump_qmp_events)
                task_status.started()
                await self.qmp.disconnected.wait()
                raise QemuGone("QMP connection closed")
        finally:
            self._nursery = None

    def detach_all(self) -> list[str]:
        """On agent exit: leave the nbdkit of every disk in QEMU serving, unsupervised.

        A disk still being added is rolled back instead (its request is
        cancelled), and one whose device is gone is stopped.  Returns the
        ids of the disks left attached.
        """
        left = []
        for disk in self.disks.values():
            if disk.phase is not Phase.ADDING and not disk.device_gone.is_set():
                disk.supervisor.detach = True
                left.append(disk.id)
        return left

    # -- ops ------------------------------------------------------------------

    async def op_ping(self, _args: protocol.PingArgs) -> dict[str, Any]:
        return {"version": __version__, "qemu": self.qmp.version}

    async def op_list(self, _args: protocol.ListArgs) -> dict[str, Any]:
        return {"disks": [d.to_wire() for d in self.disks.values()]}

    async def op_add(self, args: AddArgs) -> dict[str, Any]:
        """Start nbdkit, then blockdev-add and device_add.  Undo all on failure."""
        disk = self._new_disk(args)
        disk_id, sock = disk.id, disk.supervisor.socket_path
        self.disks[disk_id] = disk
        with structlog.contextvars.bound_contextvars(disk=disk_id):
            try:
                async with disk.lock:
                    assert self._nursery is not None
                    pid = await self._nursery.start(self._run_disk, disk)
                    disk.attachment = await self.hotplug.attach(
                        disk=disk_id, socket=sock, readonly=args.readonly, driver=args.driver,
                        reconnect_delay=(self.config.reconnect_delay
                                         if args.reconnect_delay is None
                                         else args.reconnect_delay),
                        werror=args.werror, rerror=args.rerror)
                    disk.phase = Phase.ATTACHED
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._stop_disk(disk)
                raise
            plugin = disk.spec.plugin
            log.info("disk-added", pid=pid, plugin=plugin, node=disk.attachment.node,
                     device=disk.attachment.device, bus=disk.attachment.bus)
            self.emit("disk-added", disk_id, plugin=plugin, pid=pid,
                      node=disk.attachment.node, device=disk.attachment.device)
            return disk.to_wire()

    async def op_remove(self, args: RemoveArgs) -> dict[str, Any]:
        """device_del, wait for the guest, blockdev-del, stop nbdkit.

        Raises UnplugTimeout if the guest does not release the device in
        time: the disk stays listed as ``removing`` and a retry continues.
        """
        disk = self._get(args.disk)
        if disk.lock.locked():
            raise Busy(f"disk {disk.id!r} is {disk.state}; try again", disk=disk.id)
        with structlog.contextvars.bound_contextvars(disk=disk.id):
            async with disk.lock:
                disk.phase = Phase.REMOVING
                await self._unplug(disk)
                await self._stop_disk(disk)
            log.info("disk-removed")
            self.emit("disk-removed", disk.id, reason="request")
            return {"disk": disk.id}

    async def op_restart(self, args: RestartArgs) -> dict[str, Any]:
        disk = self._get(args.disk)
        if disk.phase is not Phase.ATTACHED:
            raise InvalidState(f"disk {disk.id!r} is {disk.state}", disk=disk.id)
        disk.supervisor.request_restart()
        return disk.to_wire()

    # -- internals --------------------------------------------------------------

    def _new_disk(self, args: AddArgs) -> Disk:
        """Check an add request and build its disk (nothing started yet).

        Raises the request's error: BadRequest, PluginNotAllowed, ...,
        PathNotAllowed, PermissionDenied, Exists.
        """
        disk_id = args.disk or f"disk-{token_hex(4)}"
        spec = ExportSpec(
            plugin=args.plugin,
            params=dict(args.params),
            filters=tuple(FilterSpec(f) if isinstance(f, str) else FilterSpec(f.name, f.params)
                          for f in args.filters),
            readonly=args.readonly,
        )
        check_export(spec, self.config)
        check_secrets(spec, args.secrets)
        policy = self.config.sandbox
        params, binds = sandbox.host_paths(spec.plugin, spec.params, spec.readonly,
                                           policy.file_dirs)
        if spec.plugin == "curl":
            # file://, ftp://, ... are not disks from the network.
            params.setdefault("protocols", "http,https")
        if spec.plugin == "file":
            for path, writable in binds.items():
                sandbox.check_access(path, self.host.user, writable)
        spec = dataclasses.replace(spec, params=params)
        sock = self.config.runtime_dir / f"{disk_id}.sock"
        check_socket_path(sock)
        if disk_id in self.disks:
            raise Exists(f"disk {disk_id!r} exists", disk=disk_id)
        plan = sandbox.plan(self.host, policy, spec.plugin, binds)
        argv = build_argv(self.config.nbdkit, spec, filters=plan.filters,
                          filter_params=plan.filter_params)
        standin_plan = sandbox.plan(self.host, policy, "null", {})
        # QEMU refuses to reconnect a writable node to a read-only export.
        standin = (build_argv(self.config.nbdkit, ExportSpec("null", readonly=spec.readonly),
                              filters=standin_plan.filters,
                              filter_params=standin_plan.filter_params), standin_plan)
        sup = Supervisor(disk_id, sock, argv, self.config,
                         lambda name, **kw: self.emit(name, disk_id, **kw),
                         plan=plan, secrets=args.secrets, standin=standin)
        return Disk(disk_id, spec, args, sup)

    def _get(self, disk_id: str) -> Disk:
        try:
            return self.disks[disk_id]
        except KeyError:
            raise NotFound(f"no disk {disk_id!r}", disk=disk_id) from None

    async def _run_disk(self, disk: Disk, *, task_status: trio.TaskStatus[int]) -> None:
        disk.task_started = True
        # The task inherits the add request's context: keep disk=, not request_id=.
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(disk=disk.id)
        try:
            with disk.scope:
                await disk.supervisor.run(task_status=task_status)
        finally:
            disk.stopped.set()

    async def _stop_disk(self, disk: Disk) -> None:
        """Stop nbdkit (reaped, socket closed and removed) and forget the disk."""
        disk.scope.cancel()
        if disk.task_started:
            await disk.stopped.wait()
        self.disks.pop(disk.id, None)

    async def _unplug(self, disk: Disk) -> None:
        att = disk.attachment
        if att is None:
            return
        if not disk.device_gone.is_set():
            present = await self.hotplug.request_unplug(att.device)
            if present:
                with trio.move_on_after(self.config.unplug_timeout):
                    await disk.device_gone.wait()
                if not disk.device_gone.is_set():
                    raise UnplugTimeout(
                        f"the guest did not release {att.device} within "
                        f"{self.config.unplug_timeout:g}s; the disk stays 'removing', "
                        f"retry remove", disk=disk.id)
        async with disk.supervisor.standin():
            await self.hotplug.delete_node(att.node)

    async def _pump_qmp_events(self) -> None:
        async for ev in self.qmp.events:
            name = ev.get("event")
            data = ev.get("data", {})
            if name == "DEVICE_DELETED":
                self._on_device_deleted(data.get("device"))
            elif name == "BLOCK_IO_ERROR":
                self._on_io_error(data)
            elif name == "SHUTDOWN":
                log.info("qemu-shutdown", reason=data.get("reason"))
                self.emit("qemu-shutdown", None, reason=data.get("reason"))

    def _disk_by(self, attr: str, value: Any) -> Disk | None:
        for disk in self.disks.values():
            if disk.attachment and getattr(disk.attachment, attr) == value:
                return disk
        return None

    def _on_device_deleted(self, device: str | None) -> None:
        disk = self._disk_by("device", device)
        if disk is None:
            return
        disk.device_gone.set()
        if disk.phase is Phase.ATTACHED and not disk.lock.locked():
            # Not asked by us: the guest ejected it.  Clean up behind it.
            assert self._nursery is not None
            self._nursery.start_soon(self._cleanup_ejected, disk)

    async def _cleanup_ejected(self, disk: Disk) -> None:
        with structlog.contextvars.bound_contextvars(disk=disk.id):
            log.info("device-ejected-by-guest")
            async with disk.lock:
                disk.phase = Phase.REMOVING
                try:
                    await self._unplug(disk)
                except AgentError as err:
                    log.error("eject-cleanup-failed", error=err.message, code=err.code)
                    return
                await self._stop_disk(disk)
            self.emit("disk-removed", disk.id, reason="guest")

    def _on_io_error(self, data: dict[str, Any]) -> None:
        disk = self._disk_by("node", data.get("node-name"))
        if disk is None:
            return
        if data.get("action") == "stop":
            disk.paused_vm = True
            # The error can arrive after the recovery that cures it (with
            # reconnect-delay 0 the failed request races the restart).  One
            # resume per recovery: an error that persists stays paused.
            if (disk.supervisor.state is ProcState.RUNNING
                    and disk.supervisor.restarts > disk.resumed_at):
                assert self._nursery is not None
                self._nursery.start_soon(self._resume_vm, disk)
        log.warning("io-error", disk=disk.id, operation=data.get("operation"),
                    action=data.get("action"), reason=data.get("reason"))
        self.emit("io-error", disk.id, operation=data.get("operation"),
                  action=data.get("action"), reason=data.get("reason"))

    async def _resume_vm(self, disk: Disk) -> None:
        """After our disk recovered: resume a VM that QEMU paused because of it.

        QEMU's NBD client reconnects lazily: a ``cont`` that comes before it
        has can see the retried request fail and the VM pause again.  So
        while the VM is paused on an I/O error and the disk still runs, the
        resume is retried after a growing delay, a bounded number of times.
        """
        if not disk.paused_vm:
            return
        disk.paused_vm = False
        disk.resumed_at = disk.supervisor.restarts
        with structlog.contextvars.bound_contextvars(disk=disk.id):
            try:
                for attempt, delay in enumerate(RESUME_DELAYS, 1):
                    await trio.sleep(delay)
                    if disk.supervisor.state is not ProcState.RUNNING:
                        return  # down again: its next recovery resumes
                    status = await self.qmp.execute("query-status")
                    if status.get("status") != "io-error":
                        return
                    await self.qmp.execute("cont")
                    log.info("vm-resumed", attempt=attempt)
                    self.emit("vm-resumed", disk.id, attempt=attempt)
                log.error("vm-resume-gave-up", attempts=len(RESUME_DELAYS))
            except AgentError as err:
                log.error("vm-resume-failed", error=err.message, code=err.code)


def check_runtime_dir(path: Path) -> None:
    """Create the private runtime dir (0700) or check an existing one."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    leftovers = sorted(p.name for p in path.iterdir())
    if leftovers:
        log.warning("runtime-dir-not-empty", path=str(path), entries=leftovers[:20])
