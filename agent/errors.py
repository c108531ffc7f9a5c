"""The agent's errors: one root, each class with a machine-readable code.

The ``code`` of an error is what a control-socket client sees in
``{"ok": false, "error": {"code": ...}}``; it is part of the protocol.

AgentError                      (abstract root)
 +-- BadRequest                 bad-request
 +-- LineTooLong                line-too-long
 +-- UnknownOp                  unknown-op
 +-- NotFound                   not-found
 +-- Exists                     exists
 +-- InvalidState               invalid-state
 +-- PluginNotAllowed           plugin-not-allowed
 +-- FilterNotAllowed           filter-not-allowed
 +-- ParamNotAllowed            param-not-allowed
 +-- PathNotAllowed             path-not-allowed
 +-- PermissionDenied           permission-denied
 +-- NbdkitFailed               nbdkit-failed      (carries the stderr tail)
 +-- NoFreeSlot                 no-free-slot
 +-- UnplugTimeout              unplug-timeout
 +-- Busy                       busy
 +-- QmpError                   qmp-error          (carries QEMU's error class)
      +-- QmpTimeout            qmp-timeout
      +-- QmpDisconnected       qmp-disconnected
 +-- StartupError               startup-failed     (daemon start-up only)
"""

from __future__ import annotations

from typing import Any, ClassVar


class AgentError(Exception):
    """Root of every error the agent raises on purpose.

    ``context`` holds key/value details (``disk``, ``qmp_class``, ...) that go
    into the log line and, where useful, into the error reply.
    """

    code: ClassVar[str] = "internal-error"

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = context

    def to_wire(self) -> dict[str, Any]:
        """The ``error`` object of a control-protocol reply."""
        wire: dict[str, Any] = {"code": self.code, "message": self.message}
        wire.update({k: v for k, v in self.context.items() if v is not None})
        return wire


class BadRequest(AgentError):
    code = "bad-request"


class LineTooLong(AgentError):
    code = "line-too-long"


class UnknownOp(AgentError):
    code = "unknown-op"


class NotFound(AgentError):
    code = "not-found"


class Exists(AgentError):
    code = "exists"


class InvalidState(AgentError):
    code = "invalid-state"


class PluginNotAllowed(AgentError):
    code = "plugin-not-allowed"


class FilterNotAllowed(AgentError):
    code = "filter-not-allowed"


class ParamNotAllowed(AgentError):
    code = "param-not-allowed"


class PathNotAllowed(AgentError):
    code = "path-not-allowed"


class PermissionDenied(AgentError):
    code = "permission-denied"


class NbdkitFailed(AgentError):
    """nbdkit did not come up, or stopped answering; ``stderr`` is its tail."""

    code = "nbdkit-failed"


class NoFreeSlot(AgentError):
    code = "no-free-slot"


class UnplugTimeout(AgentError):
    code = "unplug-timeout"


class Busy(AgentError):
    code = "busy"


class QmpError(AgentError):
    """QEMU refused a command; ``qmp_class`` is QEMU's error class."""

    code = "qmp-error"


class QmpTimeout(QmpError):
    code = "qmp-timeout"


class QmpDisconnected(QmpError):
    """The QMP connection is gone (QEMU exited or closed the monitor)."""

    code = "qmp-disconnected"


class StartupError(AgentError):
    code = "startup-failed"
