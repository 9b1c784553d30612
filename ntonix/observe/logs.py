"""The gateway's log observers.

Console: one readable line per event on stdout (ANSI colours by level when
``logging.enable_colors`` and stdout is a terminal), used when
``logging.file`` is empty. File: one JSON object per line with timestamp,
level, component (the logger namespace), message and the event's own fields,
rotated by size with Twisted's ``LogFile``. ``logging.level`` filters both
(``trace`` is Twisted's debug: Twisted has no lower level).
"""

import datetime
import functools
import json
import os
import re
import string
import sys
import threading
from typing import IO, Any, Dict, List, Optional, Tuple

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from zope.interface import implementer

from ntonix.config import LoggingConfig

LEVELS = {"trace": LogLevel.debug, "debug": LogLevel.debug, "info": LogLevel.info,
          "warn": LogLevel.warn, "error": LogLevel.error}
COLOURS = {"debug": "\x1b[2m", "info": "", "warn": "\x1b[33m", "error": "\x1b[31m",
           "critical": "\x1b[1;31m"}
RESET = "\x1b[0m"


# Twisted's own lines for each port opening and closing ("GatewayServer starting
# on 8080", "(TCP Port 8080 Closed)"): the gateway logs its listeners itself,
# by role ("http listening on 0.0.0.0:8080"), so these are only debug detail.
_PORT_CHATTER = re.compile(r"\S+ starting on \d+|\(\S+ Port \d+ Closed\)")


@implementer(ILogFilterPredicate)
class PortChatter:
    def __init__(self, level: LogLevel) -> None:
        self.shown = level <= LogLevel.debug

    def __call__(self, event: Dict[str, Any]) -> PredicateResult:
        if (not self.shown and event.get("log_namespace") == "log_legacy"
                and _PORT_CHATTER.fullmatch(formatEvent(event))):
            return PredicateResult.no
        return PredicateResult.maybe


def _level(event: Dict[str, Any]) -> str:
    level = event.get("log_level")
    return level.name if level is not None else "info"


def _stamp(event: Dict[str, Any]) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(event.get("log_time") or 0, datetime.timezone.utc)


_FORMATTER = string.Formatter()
_CONVERT = {"r": repr, "s": str, "a": ascii}
Compiled = Tuple[Tuple[str, Optional[str], str, Optional[str]], ...]


@functools.lru_cache(maxsize=1024)
def _compile(fmt: str) -> Optional[Compiled]:
    """A format string's literal parts and plain field names, parsed once.

    None when it uses more than plain names (calls, attributes, indexes,
    nested specs), which Twisted's own formatter then handles.
    """
    parts = []
    try:
        for literal, field, spec, conversion in _FORMATTER.parse(fmt):
            if field is not None and (not field.isidentifier() or "{" in (spec or "")):
                return None
            parts.append((literal, field, spec or "", conversion))
    except ValueError:
        return None
    return tuple(parts)


def format_event(event: Dict[str, Any]) -> str:
    """``twisted.logger.formatEvent``, with each format string parsed once.

    Twisted re-parses the format of every event through ``string.Formatter``
    (about 15 us for an access line, a quarter of the cost of logging it);
    events it would format differently (no format, legacy text, fields that
    are missing or fail to format) go to it unchanged.
    """
    fmt = event.get("log_format")
    compiled = _compile(fmt) if isinstance(fmt, str) else None
    if compiled is None:
        return formatEvent(event)
    out = []
    try:
        for literal, field, spec, conversion in compiled:
            out.append(literal)
            if field is not None:
                value = event[field]
                if conversion:
                    value = _CONVERT[conversion](value)
                out.append(format(value, spec))
    except Exception:
        return formatEvent(event)
    return "".join(out)


def _message(event: Dict[str, Any]) -> str:
    text = format_event(event)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        text = f"{text}\n{failure.getTraceback()}"
    return text


class TurnFlush:
    """Flushes a log stream once per reactor turn instead of once per line.

    Under load one turn of the reactor finishes many requests: their access
    lines leave in one write at the end of the turn, not a write each (half
    the cost of logging a line, measured). Nobody waits for the flush: it
    runs before the reactor next sleeps. Without a running reactor (start-up,
    shutdown) or off its thread, a line is flushed at once, as before.
    """

    def __init__(self, stream: Any, reactor: Any = None) -> None:
        self.stream = stream
        self.reactor = reactor
        self.thread = threading.get_ident()
        self.pending = False

    def __call__(self) -> None:
        r = self.reactor
        if r is None or not r.running or threading.get_ident() != self.thread:
            self.stream.flush()
        elif not self.pending:
            self.pending = True
            r.callLater(0, self._flush)

    def _flush(self) -> None:
        self.pending = False
        self.stream.flush()


@implementer(ILogObserver)
class ConsoleObserver:
    def __init__(self, stream: IO[str], colours: bool, reactor: Any = None) -> None:
        self.stream = stream
        self.colours = colours
        self.flush = TurnFlush(stream, reactor)

    def __call__(self, event: Dict[str, Any]) -> None:
        level = _level(event)
        line = (f"{_stamp(event):%Y-%m-%dT%H:%M:%S.%f}"[:-3] + "Z "
                f"{level.upper():<5} [{event.get('log_namespace', '-')}] {_message(event)}")
        if self.colours and COLOURS.get(level):
            line = COLOURS[level] + line + RESET
        self.stream.write(line.replace("\n", "\n\t") + "\n")
        self.flush()


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


@implementer(ILogObserver)
class JsonLinesObserver:
    """One JSON object per line; the event's own fields ride along."""

    def __init__(self, out: Any, reactor: Any = None) -> None:
        self.out = out
        self.flush = TurnFlush(out, reactor)

    def __call__(self, event: Dict[str, Any]) -> None:
        record = {
            "timestamp": _stamp(event).isoformat(timespec="milliseconds"),
            "level": _level(event),
            "component": event.get("log_namespace", "-"),
            "message": _message(event),
        }
        for key, value in event.items():
            if not key.startswith("log_") and key not in record and key != "format":
                record[key] = _jsonable(value)
        self.out.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.flush()


def open_log_file(path: str, max_file_size_mb: float, max_files: int) -> LogFile:
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    return LogFile(name, directory, rotateLength=int(max_file_size_mb * 1024 * 1024),
                   maxRotatedFiles=max_files)


def make_observer(cfg: LoggingConfig, stdout: IO[str] = sys.stdout,
                  daemon_log: Optional[str] = None, reactor: Any = None) -> ILogObserver:
    """``daemon_log``: a daemonized process has no useful stdout, so without
    ``logging.file`` its text log goes to that file (twistd's own log file).
    ``reactor``: flush once per turn of it (else once per line)."""
    observers: List[ILogObserver] = []
    if cfg.file:
        observers.append(JsonLinesObserver(open_log_file(cfg.file, cfg.max_file_size_mb,
                                                         cfg.max_files), reactor))
    elif daemon_log:
        observers.append(ConsoleObserver(
            open_log_file(daemon_log, cfg.max_file_size_mb, cfg.max_files), False, reactor))
    elif cfg.enable_console:
        tty = hasattr(stdout, "isatty") and stdout.isatty()
        observers.append(ConsoleObserver(stdout, cfg.enable_colors and tty, reactor))

    @implementer(ILogObserver)
    def fan_out(event: Dict[str, Any]) -> None:
        for o in observers:
            o(event)

    level = LEVELS[cfg.level]
    return FilteringLogObserver(
        fan_out, [LogLevelFilterPredicate(defaultLogLevel=level), PortChatter(level)])
