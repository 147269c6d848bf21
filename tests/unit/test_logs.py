import io
import json

from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.logger._legacy import publishToNewObserver
from twisted.python.failure import Failure
from twisted.python.log import textFromEventDict
from twisted.web._newclient import ResponseNeverReceived

from spegel_tx.logs import JSONLinesObserver, QuietTwisted, error_text, level_filter


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


def test_twisted_own_info_lines_are_debug_and_its_warnings_stay():
    """What twistd and Twisted's ports say at info ("Site starting on 5000", "Starting
    factory <...>") is not for operators; a warning from Twisted still is."""
    out = io.StringIO()
    publisher = LogPublisher(QuietTwisted(level_filter(JSONLinesObserver(out), "INFO")))
    # What twisted.python.log.msg("Site starting on 5000") publishes:
    legacy = {"message": ("Site starting on 5000",), "isError": 0, "system": "-", "time": 0}
    publishToNewObserver(publisher, legacy, textFromEventDict)
    Logger(namespace="twisted.web.server.Site", observer=publisher).info(
        "Starting factory {factory!r}", factory=object()
    )
    Logger(namespace="twisted.internet.base", observer=publisher).warn("disk full")
    Logger(namespace="spegel_tx.service", observer=publisher).info("started")
    assert [json.loads(line)["msg"] for line in out.getvalue().splitlines()] == [
        "disk full",
        "started",
    ]
    debug = io.StringIO()
    publisher = LogPublisher(QuietTwisted(level_filter(JSONLinesObserver(debug), "DEBUG")))
    publishToNewObserver(publisher, legacy, textFromEventDict)
    record = json.loads(debug.getvalue())
    assert (record["level"], record["msg"]) == ("debug", "Site starting on 5000")


def test_a_wrapped_web_client_error_reads_as_its_causes():
    error = ResponseNeverReceived(
        [Failure(ConnectionRefusedError("10.0.0.2", 5000)), Failure(ConnectionDone())]
    )
    assert str(error).startswith("[<twisted.python.failure.Failure")
    assert error_text(error) == (
        "Connection was refused by other side: 10.0.0.2: 5000.; Connection was closed cleanly."
    )
    assert error_text(Failure(ValueError())) == "ValueError"
    out = io.StringIO()
    Logger(namespace="t", observer=LogPublisher(JSONLinesObserver(out))).info(
        "peer failed", reason=error, namespace="not the namespace"
    )
    record = json.loads(out.getvalue())
    assert record["reason"] == error_text(error), "an exception field is its text, not a repr"
    assert record["namespace"] == "t", "a field never overrides the line's own keys"
