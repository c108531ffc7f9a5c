"""structlog set-up: console rendering on a TTY, JSON lines otherwise.

Called once from the entry point. Modules only call ``structlog.get_logger()``.
Standard-library ``logging`` (qemu.qmp logs there) goes through the same
processors, so every line on stderr has one format.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog


def configure_logging(level: str = "info", *, stream: TextIO | None = None,
                      json: bool | None = None) -> None:
    """Configure structlog and stdlib logging for the whole process.

    ``json`` defaults to "stderr is not a TTY".
    """
    out = stream if stream is not None else sys.stderr
    use_json = not out.isatty() if json is None else json
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if use_json:
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        # Plain tracebacks: a "rich" one would print local variables, secrets
        # included.
        renderer = structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback)
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # qemu.qmp narrates its protocol steps and logs failures that the QMP
    # bridge reports itself, with more context; keep only its worst.
    logging.getLogger("qemu.qmp").setLevel(
        logging.DEBUG if numeric <= logging.DEBUG else logging.CRITICAL)
