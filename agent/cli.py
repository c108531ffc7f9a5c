"""Entry point: ``nbd-hotplug serve`` (the agent) and the client commands.

Exit status of ``serve``: 0 after SIGTERM/SIGINT, 1 if it could not start,
3 when QEMU went away (every nbdkit stopped first).  Client commands exit 0
on success and 1 on an error reply (its code is printed), 2 on usage
errors, 4 if the agent cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

import structlog
import trio

from agent import __version__, sandbox
from agent.client import open_control
from agent.config import Config, default_base_dir, default_runtime_dir, load_config
from agent.daemon import Daemon, QemuGone, check_runtime_dir
from agent.errors import StartupError
from agent.logs import configure_logging
from agent.qmp import open_qmp
from agent.server import ControlServer, bind_control_socket

EXIT_STARTUP = 1
EXIT_QEMU_GONE = 3
EXIT_UNREACHABLE = 4

log = structlog.get_logger()


# -- serve ----------------------------------------------------------------------

def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions inside (nested) exception groups."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


async def serve(config: Config) -> int:
    """Run the agent until a signal or until QEMU goes away; returns the exit status."""
    status = 0
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        sock = None
        try:
            sock = bind_control_socket(config.control_path, config)
            check_runtime_dir(config.runtime_dir)
            async with open_qmp(config.qmp_path, timeout=config.qmp_timeout) as qmp:
                log.info("qmp-attached", qmp=str(config.qmp_path), qemu=qmp.version,
                         qemu_uid=qmp.peer_uid)
                host = await trio.to_thread.run_sync(sandbox.detect, config.sandbox,
                                                     qmp.peer_uid)
                log.info("sandbox-layers", **host.available())
                daemon = Daemon(config, qmp, host)
                async with trio.open_nursery() as nursery:
                    await nursery.start(daemon.run)
                    await nursery.start(ControlServer(config, daemon).run, sock)
                    log.info("agent-ready", control=str(config.control_path),
                             runtime_dir=str(config.runtime_dir), version=__version__)
                    async for signum in signals:
                        left = daemon.detach_all()
                        log.info("agent-stopping", signal=signal.Signals(signum).name,
                                 disks_left_attached=sorted(left))
                        nursery.cancel_scope.cancel()
                        break
        except* StartupError as group:
            for err in _leaves(group):
                log.error("startup-failed", error=str(err))
            status = EXIT_STARTUP
        except* QemuGone:
            log.error("qemu-gone", detail="QMP connection closed; every nbdkit was stopped")
            status = EXIT_QEMU_GONE
        except* OSError as oserrs:
            for oserr in _leaves(oserrs):
                log.error("startup-failed", error=str(oserr))
            status = EXIT_STARTUP
        finally:
            if sock is not None:
                sock.close()
                if status == EXIT_STARTUP:
                    config.control_path.unlink(missing_ok=True)
    log.info("agent-stopped", status=status)
    return status


# -- client commands ---------------------------------------------------------------

def _kv(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, value


def _filter(text: str) -> dict[str, Any] | str:
    name, _, rest = text.partition(":")
    if not rest:
        return name
    params = dict(_kv(p) for p in rest.split(","))
    return {"name": name, "params": params}


def _request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    if args.command == "add":
        fields: dict[str, Any] = {"plugin": args.plugin, "params": dict(args.params),
                                  "readonly": args.readonly, "driver": args.driver}
        if args.disk:
            fields["disk"] = args.disk
        if args.filter:
            fields["filters"] = args.filter
        if args.secret:
            fields["secrets"] = _read_secrets(args.secret)
        for key in ("reconnect_delay", "werror", "rerror"):
            if getattr(args, key) is not None:
                fields[key] = getattr(args, key)
        return "add", fields
    if args.command in ("remove", "restart"):
        return args.command, {"disk": args.disk}
    return args.command, {}


def _read_secrets(items: list[str]) -> dict[str, str]:
    """KEY=FILE pairs -> {KEY: content}; secrets never go on a command line."""
    out: dict[str, str] = {}
    for item in items:
        key, _, source = item.partition("=")
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
        out[key] = text.rstrip("\n")
    return out


def _human(op: str, result: dict[str, Any]) -> str:
    if op == "list":
        cols = ("disk", "state", "plugin", "pid", "restarts", "device", "bus", "readonly")
        rows = [[str(d.get(c, "") if d.get(c) is not None else "-") for c in cols]
                for d in result["disks"]]
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
                  for i, c in enumerate(cols)]
        lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
        return "\n".join(lines)
    if op == "ping":
        return f"nbd-hotplug {result['version']}, QEMU {result['qemu']}"
    if op == "subscribe":
        return "watching events (Ctrl-C to stop)"
    if op in ("add", "restart"):
        return (f"{result['disk']}: {result['state']} (nbdkit pid {result['pid']}, "
                f"device {result['device']} on {result['bus']}, node {result['node']})")
    return f"{result['disk']}: removed"


def _event_line(ev: dict[str, Any]) -> str:
    extra = " ".join(f"{k}={v}" for k, v in ev.items() if k not in ("event", "disk", "ts"))
    return f"{ev['ts']:.3f} {ev['event']} disk={ev['disk']} {extra}".rstrip()


async def client_command(args: argparse.Namespace) -> int:
    op, fields = _request(args)
    try:
        async with open_control(args.control) as client:
            reply = await client.call(op, **fields)
            if args.json:
                print(json.dumps(reply), flush=True)
            if not reply.get("ok"):
                err = reply.get("error", {})
                print(f"nbd-hotplug: {err.get('code')}: {err.get('message')}", file=sys.stderr)
                return 1
            if not args.json:
                print(_human(op, reply["result"]), flush=True)
            if op == "subscribe":
                async for ev in client.events():
                    print(json.dumps(ev) if args.json else _event_line(ev), flush=True)
                print("nbd-hotplug: the agent closed the connection", file=sys.stderr)
                return EXIT_UNREACHABLE
            return 0
    except (OSError, EOFError) as err:
        print(f"nbd-hotplug: cannot talk to the agent at {args.control}: {err}",
              file=sys.stderr)
        return EXIT_UNREACHABLE


# -- argument parsing ------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    base = default_base_dir()
    parser = argparse.ArgumentParser(prog="nbd-hotplug", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--control", type=Path, default=base / "control.sock",
                        help="control socket (default: %(default)s)")

    s = sub.add_parser("serve", parents=[common], help="run the agent")
    s.add_argument("--qmp", type=Path, required=True, help="QEMU's QMP Unix socket")
    s.add_argument("--runtime-dir", type=Path,
                   help="private dir for nbdkit sockets (default: next to --control)")
    s.add_argument("--config", type=Path, help="TOML configuration file")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    s.add_argument("--nbdkit", help="nbdkit binary")
    s.add_argument("--reconnect-delay", type=int, help="default reconnect-delay (s)")
    s.add_argument("--health-interval", type=float, help="seconds between health probes")
    s.add_argument("--health-timeout", type=float, help="health probe deadline (s)")
    s.add_argument("--unplug-timeout", type=float, help="deadline for the guest to unplug")
    s.add_argument("--file-dir", type=Path, action="append", dest="file_dirs",
                   help="a directory the file plugin may serve from (repeat)")
    s.add_argument("--run-as", help="user nbdkit runs as when the agent is root "
                   "(default: nbd-hotplug, else nobody)")

    for name, help_ in (("ping", "check the agent and QEMU"), ("list", "list disks"),
                        ("watch", "print events as they come")):
        p = sub.add_parser(name, parents=[common], help=help_)
        p.add_argument("--json", action="store_true", help="JSON output")

    a = sub.add_parser("add", parents=[common], help="hot-add an nbdkit-backed disk")
    a.add_argument("plugin", help="nbdkit plugin, e.g. file, memory, curl")
    a.add_argument("params", nargs="*", type=_kv, help="plugin parameters key=value")
    a.add_argument("--disk", help="disk id (default: generated)")
    a.add_argument("--filter", action="append", type=_filter,
                   help="filter NAME or NAME:key=value,...; repeat, outermost first")
    a.add_argument("--readonly", action="store_true")
    a.add_argument("--driver", choices=["virtio-blk-pci", "scsi-hd"], default="virtio-blk-pci")
    a.add_argument("--reconnect-delay", type=int)
    a.add_argument("--werror", choices=["report", "ignore", "enospc", "stop"])
    a.add_argument("--rerror", choices=["report", "ignore", "stop"])
    a.add_argument("--secret", action="append", metavar="KEY=FILE",
                   help="read secret KEY (e.g. password) from FILE ('-': stdin); repeat")
    a.add_argument("--json", action="store_true", help="JSON output")

    for name, help_ in (("remove", "unplug a disk and stop its nbdkit"),
                        ("restart", "restart a failed disk's nbdkit")):
        r = sub.add_parser(name, parents=[common], help=help_)
        r.add_argument("disk")
        r.add_argument("--json", action="store_true", help="JSON output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        if args.command == "watch":
            args.command = "subscribe"
        return trio.run(client_command, args)
    try:
        config = load_config(
            args.config,
            qmp_path=args.qmp,
            control_path=args.control,
            runtime_dir=args.runtime_dir or default_runtime_dir(args.control),
            log_level=args.log_level,
            nbdkit=args.nbdkit,
            reconnect_delay=args.reconnect_delay,
            health_interval=args.health_interval,
            health_timeout=args.health_timeout,
            unplug_timeout=args.unplug_timeout,
            file_dirs=args.file_dirs,
            run_as=args.run_as,
        )
    except StartupError as err:
        print(f"nbd-hotplug: {err}", file=sys.stderr)
        return EXIT_STARTUP
    configure_logging(config.log_level)
    return trio.run(serve, config)
