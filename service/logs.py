"""Structured logs: one JSON object per line on stderr. Nothing is logged per
request at the default level; routing changes and lifecycle events are."""
from __future__ import annotations

import logging
import os
import sys

import orjson

from paycore.core.timestamp import format_timestamp


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": format_timestamp(int(record.created * 1000)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "instance": os.environ.get("PAYCORE_INSTANCE", ""),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
