"""Structured logging: one JSON object per line, to stderr (supervisord keeps a log per
program) and, for the processes of a run, appended to the run's shared ``trinity.log``.

Every process appends whole lines with ``O_APPEND``, so lines from different processes
interleave but are not torn; ``WatchedFileHandler`` reopens the file if it is rotated
or removed.

Every line is redacted as it is formatted (``trinity/redaction.py``): the values of
secret-named variables and ``sk-`` keys never reach stderr (supervisord's logs) or
``trinity.log``, whether they came in a message, an ``extra`` field or a traceback.
Uncaught exceptions go through logging too, so their tracebacks are redacted as well.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from trinity.redaction import Redactor

_RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, process_name: str, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.process_name = process_name
        self.redact = redactor or Redactor.from_env()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "process": self.process_name,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return self.redact(json.dumps(entry, default=str))


def configure(process_name: str, log_file: Path | None = None,
              level: int = logging.INFO) -> None:
    formatter = JsonFormatter(process_name)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            handlers.append(logging.handlers.WatchedFileHandler(log_file, encoding="utf-8"))
        except OSError as exc:  # the run goes on; stderr still has every line
            print(f"cannot open {log_file}: {exc}", file=sys.stderr)
    for handler in handlers:
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(kind: type[BaseException], exc: BaseException,
                  tb: TracebackType | None) -> None:
    logging.getLogger("trinity").critical("uncaught %s", kind.__name__,
                                          exc_info=(kind, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is not None and not issubclass(args.exc_type, SystemExit):
        thread = args.thread.name if args.thread else "?"
        logging.getLogger("trinity").critical(
            "uncaught %s in thread %s", args.exc_type.__name__, thread,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
