"""Structured JSON logs. Every line carries request_id when one is known; never raw text."""

from __future__ import annotations

import json
import logging
import sys
import time

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        line.update({k: v for k, v in vars(record).items() if k not in _RESERVED and k not in line})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


OUR_PACKAGES = ("dataflows", "connectors", "schemas", "sinks", "redaction", "ops")


def configure(level: str = "INFO") -> None:
    """JSON lines on stderr; `level` applies to gatewatch's own loggers, libraries stay at
    INFO or above (botocore at DEBUG alone would slow the flow down)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(logging.INFO, logging.getLevelName(level)))
    for package in OUR_PACKAGES:
        logging.getLogger(package).setLevel(level)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
