"""Log output for operators: one JSON object per line, and a level filter.

Use with twistd's own switch: ``twistd -n --logger spegel_tx.logs.json_observer spegel ...``.
What Twisted itself says at info level (ports opening and closing, factories starting,
twistd's banner) is debug here: the node's own startup line says what it is.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from twisted.python.failure import Failure
from zope.interface import implementer

_RESERVED = frozenset(
    (
        "log_logger",
        "log_source",
        "log_format",
        "log_level",
        "log_namespace",
        "log_time",
        "log_failure",
        "log_flattened",
        "log_trace",
        "log_io",
        "log_system",
        "log_text",
        "format",
        "message",
        "isError",
        "system",
        "time",
        "why",
        "failure",
        "log_legacy",
    )
)


def error_text(error: object) -> str:
    """An exception (or Failure) as a sentence: Twisted's web client wraps the real
    causes in a list of Failures, whose text would be their reprs."""
    if isinstance(error, Failure):
        return error_text(error.value)
    reasons = getattr(error, "reasons", None)
    if isinstance(reasons, list) and reasons:
        return "; ".join(map(error_text, reasons))
    return str(error) or type(error).__name__


def _field(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, BaseException):
        return error_text(value)
    return str(value)


def event_as_dict(event: LogEvent) -> dict[str, Any]:
    """The fields an operator greps for, plus every structured field the event carries."""
    level = event.get("log_level", LogLevel.info)
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(),
        "level": level.name,
        "namespace": event.get("log_namespace", "-"),
        "msg": formatEvent(event),
    }
    for key, value in event.items():
        if key not in _RESERVED and key not in record and not key.startswith("log_"):
            record[key] = _field(value)
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return record


@implementer(ILogObserver)
class JSONLinesObserver:
    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: LogEvent) -> None:
        self._out.write(json.dumps(event_as_dict(event), default=str) + "\n")
        self._out.flush()


def is_twisted_chatter(event: LogEvent) -> bool:
    """Info from Twisted itself: events of its namespaces, and its old ``log.msg`` calls."""
    namespace = event.get("log_namespace", "")
    twisted = namespace == "log_legacy" or namespace.startswith("twisted.")
    return twisted and event.get("log_level", LogLevel.info) == LogLevel.info


@implementer(ILogObserver)
class QuietTwisted:
    """Passes Twisted's own info events on as debug; everything else as it is."""

    def __init__(self, observer: ILogObserver) -> None:
        self._observer = observer

    def __call__(self, event: LogEvent) -> None:
        if is_twisted_chatter(event):
            event = {**event, "log_level": LogLevel.debug}
        self._observer(event)


def level_filter(observer: ILogObserver, level_name: str) -> ILogObserver:
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level_name.lower()))
    return FilteringLogObserver(observer, [predicate])


_level = "INFO"


def configure(level: str) -> None:
    """Record ``log-level``; twistd builds its observer after ``makeService``."""
    global _level
    _level = level


def json_observer() -> ILogObserver:
    """The factory twistd's ``--logger`` switch names."""
    return QuietTwisted(level_filter(JSONLinesObserver(sys.stdout), _level))
