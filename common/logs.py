"""The log format both sides share: structlog JSON lines on stderr, so one trace id reads the
same in edge and cloud logs."""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _stderr_logger(*_args: object) -> structlog.PrintLogger:
    # sys.stderr is looked up when a logger is made, not when logging is configured: a stream
    # replaced since (a redirect, a test's capture that has been closed) is never written to.
    return structlog.PrintLogger(sys.stderr)


def configure_logging(level: str = "info", *, json: bool = True) -> None:
    numeric = _LEVELS.get(level, logging.INFO)
    logging.basicConfig(
        level=max(numeric, logging.WARNING), stream=sys.stderr, format="%(message)s"
    )
    # Protocol libraries log every frame at debug level; keep them quiet unless asked.
    for noisy in ("pymodbus", "asyncua", "paho", "uvicorn", "psycopg"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == "debug" else logging.ERROR)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
