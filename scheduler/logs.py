"""Logging for every command: one line per event on stderr, text for people or JSON for log
collectors, with the passwords of any URL hidden."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]+)@", re.I)


def scrub(text: str) -> str:
    """Hide passwords of any URL in a log line."""
    return _CREDENTIALS.sub(r"\g<scheme>\g<user>:***@", text)


class _Scrubbing(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("order_id", "outcome", "worker"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["error"] = scrub(self.formatException(record.exc_info))
        return json.dumps(entry)


#: loggers of libraries whose reports of an outage the product makes itself, once per outage, and the
#: least level of theirs still shown
QUIET_LIBRARIES = {"pika": logging.CRITICAL, "apscheduler.scheduler": logging.ERROR}


def configure_logging(*, verbose: bool, json_format: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Scrubbing())
    if json_format:
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    # Outages are ours to report, once each (scheduler/outage.py): pika's own lines for every lost
    # connection and every host tried, with tracebacks, and APScheduler's warning that a run which
    # outlasted its interval skipped the next one, would repeat them on every retry.
    for name, level in QUIET_LIBRARIES.items():
        logging.getLogger(name).setLevel(level)
