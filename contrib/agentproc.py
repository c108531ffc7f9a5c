"""A running ``python -m agent serve`` seen from outside: its JSON log lines.

Shared by the tests (``tests/conftest.py``) and the benchmarks
(``contrib/bench/common.py``), which add their own ways of starting and
stopping it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio


async def wait_connectable(path: Path, timeout: float = 20.0) -> None:
    """Poll until a Unix socket accepts a connection.  Raises trio.TooSlowError."""
    with trio.fail_after(timeout):
        while True:
            try:
                stream = await trio.open_unix_socket(str(path))
            except OSError:
                await trio.sleep(0.01)
                continue
            await stream.aclose()
            return


def descendants_of(roots: set[int]) -> set[int]:
    """Pids of every live (not zombie) process below ``roots``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


class AgentProcess:
    """The agent's process, control socket, runtime dir and log lines."""

    def __init__(self, proc: trio.Process, control: Path, runtime_dir: Path) -> None:
        self.proc = proc
        self.control = control
        self.runtime_dir = runtime_dir
        self.logs: list[dict[str, Any]] = []
        self._changed = trio.Event()

    async def _read_stderr(self, task_status: trio.TaskStatus[None]) -> None:
        """Collect log lines until EOF; started once the agent logged agent-ready."""
        assert self.proc.stderr is not None
        buf = b""
        started = False
        async for chunk in self.proc.stderr:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                try:
                    entry = json.loads(line)
                except ValueError:
                    entry = {"event": "raw", "line": line.decode(errors="replace")}
                self.logs.append(entry)
                if entry.get("event") == "agent-ready" and not started:
                    started = True
                    task_status.started()
            self._changed.set()
            self._changed = trio.Event()
        if not started:
            raise RuntimeError(f"the agent exited before it was ready: {self.logs[-10:]}")

    async def wait_log(self, event: str, timeout: float = 30.0,
                       **match: Any) -> dict[str, Any]:
        """The first log entry ``event`` with the given fields (waits for it)."""
        seen = 0
        with trio.fail_after(timeout):
            while True:
                for entry in self.logs[seen:]:
                    if entry.get("event") == event and all(
                            entry.get(k) == v for k, v in match.items()):
                        return entry
                seen = len(self.logs)
                await self._changed.wait()

    def descendants(self) -> set[int]:
        """Pids of every live process below the agent (keepers and nbdkits)."""
        return descendants_of({self.proc.pid})
