"""Log lines on stderr: one line per record, in the format the config asks for.

Messages are already structured (``event=ready http_ipv4=...``); the format
only decides what goes around them. Under systemd, "journal" leaves the time
to journald and starts each line with a syslog priority (``<6>``), which
journald reads as the entry's level (``journalctl -p warning`` works). No
message carries the HMAC secret or a TLS key: they are never formatted into
one, and tests check it on a whole run at DEBUG.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# RFC 5424 severities; journald's SyslogLevelPrefix= reads "<N>".
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


# Other libraries' loggers, and the lowest level each may log at, whatever
# the configured level: aiosqlite logs every statement with its parameters
# at DEBUG (worker addresses, tokens), botocore each request's headers (the
# AWS access key id among them).
QUIET_LOGGERS = {
    "aiosqlite": logging.INFO,
    "botocore": logging.WARNING,
    "aiobotocore": logging.WARNING,
    "aioboto3": logging.WARNING,
    "boto3": logging.WARNING,
    "urllib3": logging.WARNING,
}


def _one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class JournalFormatter(logging.Formatter):
    """``<6>probe_server.server event=ready ...``; tracebacks folded into the line."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.name} {record.getMessage()}"
        if record.exc_info:
            text += " " + self.formatException(record.exc_info)
        priority = _PRIORITY.get(record.levelno, 6)
        return f"<{priority}>{_one_line(text)}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "journal":
        return JournalFormatter()
    if fmt == "json":
        return JsonFormatter()
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send every log record at ``level`` or above to stderr, one line each."""
    handler = _StderrHandler()
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    # Replace only our own handler (set up again once the config is read);
    # others, such as a test runner's, stay.
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name, lowest in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(lowest, logging.getLevelName(level)))


class _StderrHandler(logging.StreamHandler):
    """The handler :func:`setup_logging` installs.

    It writes to whatever ``sys.stderr`` is at the time of each record, not
    the one current when it was made: a caller (a test harness, an embedding
    program) may replace or close that stream.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass
