import io
import json

from twisted.logger import LogLevel, LogPublisher, Logger

from ntonix.config import LoggingConfig
from ntonix.observe.logs import JsonLinesObserver, make_observer


class TTY(io.StringIO):
    def isatty(self):
        return True


def emit(observer, level, fmt, **kw):
    pub = LogPublisher(observer)
    Logger(namespace="ntonix.test", observer=pub).emit(level, fmt, **kw)


def test_console_level_filter_and_colours_only_on_a_tty():
    plain, tty = io.StringIO(), TTY()
    for stream in (plain, tty):
        obs = make_observer(LoggingConfig(level="warn"), stdout=stream)
        emit(obs, LogLevel.info, "hidden {x}", x=1)
        emit(obs, LogLevel.warn, "shown {x}", x=2)
    assert "hidden" not in plain.getvalue()
    assert "WARN  [ntonix.test] shown 2" in plain.getvalue()
    assert "\x1b[" not in plain.getvalue() and "\x1b[33m" in tty.getvalue()
    quiet = io.StringIO()
    emit(make_observer(LoggingConfig(enable_colors=False), stdout=TTY()), LogLevel.warn, "x")
    emit(make_observer(LoggingConfig(enable_console=False), stdout=quiet), LogLevel.warn, "x")
    assert quiet.getvalue() == ""


def test_json_lines_carry_fields():
    out = io.StringIO()
    emit(JsonLinesObserver(out), LogLevel.info, "backend {backend} up", backend="b:1",
         raw=b"\xff")
    rec = json.loads(out.getvalue())
    assert rec["message"] == "backend b:1 up" and rec["backend"] == "b:1"
    assert rec["component"] == "ntonix.test" and rec["level"] == "info" and rec["raw"] == "\ufffd"


def test_twisted_port_chatter_only_at_debug():
    from twisted.python import log as legacy

    for level, shown in (("info", False), ("debug", True)):
        out = io.StringIO()
        obs = make_observer(LoggingConfig(level=level), stdout=out)
        legacy.theLogPublisher.addObserver(obs)  # the legacy path, as Twisted's ports use it
        try:
            legacy.msg("GatewaySite starting on 8080")
            legacy.msg("(TCP Port 8080 Closed)")
            legacy.msg("Site starting on the moon")  # not port chatter: kept
        finally:
            legacy.theLogPublisher.removeObserver(obs)
        text = out.getvalue()
        assert ("GatewaySite starting on 8080" in text) is shown
        assert ("(TCP Port 8080 Closed)" in text) is shown
        assert "Site starting on the moon" in text


def test_format_event_matches_twisted_formatter():
    from twisted.logger import formatEvent

    from ntonix.observe.logs import format_event

    class Thing:
        attr = "attribute"

        def __repr__(self):
            return "<thing>"

    base = {"log_time": 0.0, "log_level": LogLevel.info, "log_namespace": "t"}
    cases = [
        ("{client} {method} {status} {latency}ms", dict(client="1.2.3.4", method="POST",
                                                          status=200, latency=1.25)),
        ("{x!r} {x!s} {x!a}", dict(x="é\n")),
        ("{v:.3f} {v:>8} {{literal}} {n:05d}", dict(v=1.23456, n=42)),
        ("{b} {none} {t}", dict(b=b"\xff", none=None, t=Thing())),
        ("{t.attr} {t!r}", dict(t=Thing())),  # attribute access: Twisted's path
        ("{f()}", dict(f=lambda: "called")),  # a call: Twisted's path
        ("{missing} here", dict()),  # Twisted's "Unable to format" text
        ("{n:d}", dict(n="not a number")),  # a failing spec: Twisted's text
        ("{0} positional", dict()),
        ("unbalanced {", dict()),
        (None, dict(log_text="legacy text")),
        (None, dict(message=("legacy", "message"))),
    ]
    for fmt, fields in cases:
        event = dict(base, **fields)
        if fmt is not None:
            event["log_format"] = fmt
        assert format_event(event) == formatEvent(event), fmt


def test_lines_flushed_once_per_reactor_turn_and_at_once_without_a_running_reactor():
    import threading

    from twisted.internet.task import Clock

    from ntonix.observe.logs import ConsoleObserver

    class Counting(io.StringIO):
        flushes = 0

        def flush(self):
            self.flushes += 1
            super().flush()

    clock = Clock()
    clock.running = True
    out = Counting()
    obs = ConsoleObserver(out, False, clock)
    for i in range(5):
        emit(obs, LogLevel.info, "line {i}", i=i)
    assert out.getvalue().count("\n") == 5 and out.flushes == 0
    clock.advance(0)  # the end of this reactor turn
    assert out.flushes == 1
    emit(obs, LogLevel.info, "next turn")
    clock.advance(0)
    assert out.flushes == 2

    # Off the reactor's thread, or with no reactor running: at once.
    t = threading.Thread(target=emit, args=(obs, LogLevel.info, "from a thread"))
    t.start()
    t.join()
    assert out.flushes == 3
    clock.running = False
    emit(obs, LogLevel.info, "at shutdown")
    assert out.flushes == 4 and not clock.getDelayedCalls()
