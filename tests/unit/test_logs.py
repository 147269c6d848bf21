import io
import json

from twisted.logger import Logger, LogLevel, LogPublisher

from spegel_tx.logs import JSONLinesObserver, level_filter


def emit(observer, level, **fields):
    publisher = LogPublisher(observer)
    Logger(namespace="spegel_tx.test", observer=publisher).emit(
        level, "{method} {path} {status}", **fields
    )


def test_one_json_object_per_line_with_the_structured_fields():
    out = io.StringIO()
    emit(JSONLinesObserver(out), LogLevel.info, method="GET", path="/v2/", status=200)
    emit(JSONLinesObserver(out), LogLevel.warn, method="HEAD", path="/x", status=404)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["msg"] == "GET /v2/ 200"
    assert (first["method"], first["path"], first["status"]) == ("GET", "/v2/", 200)
    assert (first["level"], first["namespace"]) == ("info", "spegel_tx.test")
    assert json.loads(lines[1])["level"] == "warn"


def test_level_filter_drops_events_below_the_level():
    out = io.StringIO()
    observer = level_filter(JSONLinesObserver(out), "WARN")
    emit(observer, LogLevel.info, method="GET", path="/", status=200)
    emit(observer, LogLevel.error, method="GET", path="/", status=500)
    assert [json.loads(line)["status"] for line in out.getvalue().splitlines()] == [500]


def test_failures_carry_their_traceback():
    out = io.StringIO()
    log = Logger(namespace="t", observer=LogPublisher(JSONLinesObserver(out)))
    try:
        raise ZeroDivisionError("no")
    except ZeroDivisionError:
        log.failure("boom {x}", x=1)
    record = json.loads(out.getvalue())
    assert record["msg"] == "boom 1"
    assert "ZeroDivisionError" in record["traceback"]
