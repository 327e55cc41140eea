"""The ``aioov`` command: compile ahead of time, warm up, and manage a cache directory.

    aioov compile models/ --device CPU --cache-dir /var/cache/aioov
    aioov warmup models/ --cache-dir /var/cache/aioov       (the same as compile without -o)
    aioov compile model.onnx -o model.blob                   (one model's blob, for import_model)
    aioov cache ls|stats|verify|prune|clear --cache-dir /var/cache/aioov
    aioov devices

Common options (``--cache-dir``, ``--json``, ``-v``, ``--log-level``) go before or after the
command. Exit codes: 0 success, 1 a model or entry failed (a model compiled without leaving a
cache entry counts, unless ``--allow-uncached``), 2 bad arguments, 130 interrupted (Ctrl-C).
Human output escapes control characters (a file name's newline or terminal escape sequence is
printed as ``\\n``, ``\\x1b``); ``--json`` is JSON's own escaping.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import anyio

from ._bulk import BulkProgress, CompileResult
from ._cache import auth
from ._cache.store import CacheStore, EntryInfo
from ._core import Core
from ._devices import DeviceRegistry
from ._errors import AioovError, CacheError, PropertyError
from ._properties import normalize, parse_size
from ._version import __version__

__all__ = ("default_cache_dir", "main", "printable")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: seconds between two progress lines of ``cache verify``/``prune``/``clear``/``ls --scan``/``stats --scan``
PROGRESS_SECONDS = 5.0

# What a terminal would act on rather than show: C0 controls, DEL and C1 controls (ESC starts
# ANSI/OSC sequences; OSC 0 retitles the window, a newline fakes a table row), bidirectional
# overrides (text that reads differently than it is), and the lone surrogates that stand for
# a file name's undecodable bytes (printing one would raise UnicodeEncodeError).
_ESCAPES: dict[int, str] = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_ESCAPES.update({ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"})
_ESCAPES.update({c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), *range(0xD800, 0xE000))})
_ESCAPES.update({c: f"\\x{c - 0xDC00:02x}" for c in range(0xDC80, 0xDD00)})  # os.fsdecode's surrogateescape


def printable(text: object) -> str:
    """``str(text)`` safe to print on a terminal: control characters (C0, DEL, C1), bidi
    overrides and undecodable bytes written as ``\\n``, ``\\x1b``, ``\\u202e``... Every piece
    of human output that may hold a file name, a manifest's field or an error message goes
    through this; ``--json`` output has JSON's own escaping."""
    text = str(text)
    return text if text.isascii() and text.isprintable() else text.translate(_ESCAPES)  # the first: at C speed


def default_cache_dir() -> str:
    """``$AIOOV_CACHE_DIR``, else the platform's user cache dir (``~/.cache/aioov`` on Linux)."""
    env = os.environ.get("AIOOV_CACHE_DIR")
    if env:
        return env
    import platformdirs

    return platformdirs.user_cache_dir("aioov", appauthor=False)


def parse_duration(text: str) -> float:
    """``30d``, ``12h``, ``15m``, ``90s`` or plain seconds → seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a duration like 30d, 12h or 90s, got {text!r}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _device(name: str) -> str:
    """A device name aioov knows (``CPU``, ``GPU.1``, ``AUTO``...), checked by its spelling
    only: whether it is available here is each compile's to say (``aioov devices``)."""
    registry = DeviceRegistry()
    if registry.family_of(name) is None:
        raise argparse.ArgumentTypeError(
            f"unknown device {name!r}; known: AUTO, {', '.join(registry.families())} "
            "(an index picks one of several: GPU.1)"
        )
    return name


def _count(n: int, one: str, many: str | None = None) -> str:
    """``1 model``, ``2 models``, ``0 entries``."""
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _config(pairs: Sequence[str], warmup: int | None = None) -> dict[str, object]:
    config: dict[str, object] = {} if warmup is None else {"WARMUP": warmup}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise PropertyError(f"--config expects KEY=VALUE, got {pair!r}")
        if value.startswith("{"):
            try:
                config[name] = json.loads(value)
                continue
            except ValueError:
                pass
        config[name] = value
    normalized = normalize(config, allow_core=False)  # bad names and values are usage errors, before any work
    if "CACHE_DIR" in normalized:
        raise PropertyError("give the cache directory with --cache-dir, not --config CACHE_DIR=...")
    return config


def _warmed(result: Any) -> str:
    if result.compiled is None or not result.compiled.get_property("WARMUP"):
        return "-"
    return f"{result.warmup_seconds:.2f}s" if result.compiled.get_property("WARMED_UP") else "skipped (see log)"


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"  # pragma: no cover


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp)) if timestamp else "-"


def _entry_json(entry: EntryInfo) -> dict[str, Any]:
    return {
        "key": entry.key, "device": entry.device, "size": entry.size, "source": entry.source,
        "created": entry.created, "last_used": entry.last_used, "problem": entry.problem,
        "not_cacheable": entry.not_cacheable, "check": entry.check, "variant": entry.variant,
    }


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    cells = [[printable(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _print_fields(fields: list[tuple[str, str]]) -> None:
    """``label:  value`` lines, the values in one column."""
    width = max(len(label) for label, _ in fields) + 2
    for label, value in fields:
        print(f"{label + ':':{width}}{printable(value)}")


def _models_in(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """The models given, directories expanded into the ``*.onnx`` files below them, and what
    tables call each: its path below the directory given (``magika/model.onnx``, not
    ``model.onnx``), or the path as given; the path as given where two would read the same."""
    found: list[tuple[str, str]] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found.extend((str(p), str(p.relative_to(path))) for p in sorted(path.rglob("*.onnx")))
        else:
            found.append((item, item))
    repeated = Counter(label for _, label in found)
    return [p for p, _ in found], [label if repeated[label] == 1 else p for p, label in found]


class _Bar:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal). On a
    terminal, aioov's log clears the bar's line before a record and draws it again after
    (``_LogHandler``, #43.7): a warning written after the bar's text would share its line."""

    def __init__(self, labels: list[str], quiet: bool) -> None:
        self.labels = labels
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        #: the bar is drawn from the event loop's thread; log records come from any thread
        self.lock = threading.RLock()
        #: the bar as the terminal shows it now, the cursor at its end; "" when none is open
        self.line = ""

    def __call__(self, event: BulkProgress) -> None:
        if self.quiet:
            return
        result = event.current
        status = "cached" if result.from_cache else ("FAILED" if result.error else "compiled")
        name = printable(self.labels[result.index])
        with self.lock:
            if self.tty:
                filled = int(30 * event.done / max(1, event.total))
                bar = "#" * filled + "-" * (30 - filled)
                line = f"[{bar}] {event.done}/{event.total} {status:8} {name[-40:]:40}"
                last = event.done == event.total
                sys.stderr.write(f"\r{line}" + ("\n" if last else ""))
                self.line = "" if last else line
            else:
                sys.stderr.write(f"[{event.done}/{event.total}] {status} {name} ({result.seconds:.2f}s)\n")
            sys.stderr.flush()

    def clear(self) -> None:
        """Blank the bar's line (spaces: no escape sequence), the cursor at its start."""
        if self.line:
            sys.stderr.write("\r" + " " * len(self.line) + "\r")

    def redraw(self) -> None:
        if self.line:
            sys.stderr.write(f"\r{self.line}")
            sys.stderr.flush()

    def close(self) -> None:
        """End a bar left open (the warm-up interrupted): what follows starts a line."""
        with self.lock:
            if self.line:
                sys.stderr.write("\n")
                sys.stderr.flush()
                self.line = ""


# -- logging ----------------------------------------------------------------------------------


class _LogFormatter(logging.Formatter):
    """``warning: aioov cache: ...``, the message's control characters escaped."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {printable(record.message)}"


if TYPE_CHECKING:
    _StreamHandler = logging.StreamHandler[TextIO]
else:
    _StreamHandler = logging.StreamHandler  # generic only from Python 3.11


class _LogHandler(_StreamHandler):
    """aioov's log on stderr; while a progress bar is drawn there (``bar``), each record gets a
    line of its own, the bar drawn again below it."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.bar: _Bar | None = None

    def emit(self, record: logging.LogRecord) -> None:
        bar = self.bar
        if bar is None:
            super().emit(record)
            return
        with bar.lock:
            bar.clear()
            super().emit(record)
            bar.redraw()


class _Warnings(logging.Handler):
    """The warnings logged while models compile, to say why a model left no cache entry."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.append(record.getMessage())
        except Exception:  # pragma: no cover - a bad format string
            self.handleError(record)

    def why(self, model: str, models: Sequence[str]) -> str | None:
        """The last warning naming ``model``; else the last naming no model (a cache directory
        that refused writes is said once for all)."""
        path = os.path.abspath(model)
        for message in reversed(self.messages):
            if path in message:  # "aioov cache: /models/a.onnx not cached this time: ..."
                return message.removeprefix("aioov cache: ").removeprefix(f"{path} ")
        others = [os.path.abspath(m) for m in models]
        for message in reversed(self.messages):
            if not any(other in message for other in others):
                return message.removeprefix("aioov cache: ")
        return None


_log_handler: _LogHandler | None = None


def _configure_logging(args: argparse.Namespace) -> None:
    """aioov's log on stderr: warnings by default, ``-v`` info, ``-vv`` debug, or ``--log-level``."""
    global _log_handler
    verbose = sum(value for name, value in vars(args).items() if name.startswith("verbose"))
    level = args.log_level or ("WARNING" if verbose == 0 else "INFO" if verbose == 1 else "DEBUG")
    logger = logging.getLogger("aioov")
    if _log_handler is not None:  # main() called again in one process
        logger.removeHandler(_log_handler)
    _log_handler = _LogHandler()
    _log_handler.setFormatter(_LogFormatter())
    logger.addHandler(_log_handler)
    logger.setLevel(level)


# -- commands -----------------------------------------------------------------------------


async def _compile(args: argparse.Namespace) -> int:
    """``compile``: ``warmup`` (the same work), or with ``-o`` one model's blob to a directory."""
    if args.output is None:
        return await _warmup(args)
    config = _config(args.config, args.warmup)
    models, _ = _models_in(args.models)
    if len(models) != 1:
        print("aioov compile: -o/--output takes exactly one model", file=sys.stderr)
        return EXIT_USAGE
    async with Core() as core:
        await core.export_model(models[0], args.output, args.device, config)
    print(f"wrote {printable(args.output)}")
    return EXIT_OK


@dataclass(frozen=True)
class _Outcome:
    """Where one model of a warm-up stands with the cache once every export has finished."""

    result: CompileResult
    label: str
    cached: bool = False  # the cache holds an entry for it now
    not_cacheable: str | None = None  # why it never will (a marker, or a device that keeps no entries)
    uncached: str | None = None  # why it has no entry after all (the builder could not run, disk full...)

    @property
    def status(self) -> str:
        if self.result.error is not None:
            return "FAILED"
        if self.uncached is not None:
            return "NOT CACHED"
        if self.not_cacheable is not None:
            return "not cacheable"
        return "cached" if self.result.from_cache else "compiled"


def _outcome(result: CompileResult, label: str, store: CacheStore, warnings: _Warnings, models: list[str]) -> _Outcome:
    """Whether ``result``'s model has its entry now; if not, why (and whether that is a fault)."""
    compiled = result.compiled
    if compiled is None:
        return _Outcome(result, label)
    reason = compiled.get_property("NOT_CACHED_REASON")
    if reason:  # its blobs failed their checks here before: a marker says so, and compiles skip the cache
        return _Outcome(result, label, not_cacheable=str(reason).removeprefix("not cacheable here: "))
    key = compiled.get_property("CACHE_KEY")
    if key is None:
        if store.is_cache() and os.access(store.base, os.W_OK | os.X_OK):
            return _Outcome(result, label, not_cacheable=f"device {result.device} keeps no cache entries")
        why = warnings.why(str(result.model), models) or f"the cache directory {store.root} cannot be used"
        return _Outcome(result, label, uncached=why)
    if not os.path.lexists(store.entry_path(key)):
        why = warnings.why(str(result.model), models) or "no warning said why; run with -v"
        return _Outcome(result, label, uncached=why)
    info = store.info(key)
    if info.not_cacheable is not None:  # its blobs failed the builder's checks in this run
        return _Outcome(result, label, not_cacheable=info.not_cacheable)
    if info.problem is not None:
        return _Outcome(result, label, uncached=f"its entry is broken: {info.problem}")
    return _Outcome(result, label, cached=True)


async def _warmup(args: argparse.Namespace) -> int:
    """``warmup``, and ``compile`` without ``-o``: every model into the cache, with a summary."""
    config = _config(args.config, args.warmup)
    models, labels = _models_in(args.models)
    if not models:
        print(f"aioov: no models found in {', '.join(printable(m) for m in args.models)} (no *.onnx file below)",
              file=sys.stderr)
        return EXIT_USAGE
    store = CacheStore(args.cache_dir)
    if store.root.is_dir() and any(store.root.iterdir()) and not store.is_cache():
        print(f"aioov: {printable(store.root)} is not empty and not an aioov cache; give a new or empty --cache-dir",
              file=sys.stderr)
        return EXIT_USAGE
    started = time.perf_counter()
    warnings = _Warnings()
    logger = logging.getLogger("aioov")
    logger.addHandler(warnings)
    bar = _Bar(labels, args.json or args.quiet)
    if _log_handler is not None:
        _log_handler.bar = bar
    try:
        async with Core(cache_dir=args.cache_dir, max_concurrent_compiles=args.max_concurrency) as core:
            results = await core.compile_all(models, args.device, config, progress=bar)
            await core.wait_exports()  # then each model's entry is in the cache, or never will be
            stats = core.cache_stats
    finally:
        logger.removeHandler(warnings)
        if _log_handler is not None:
            _log_handler.bar = None
        bar.close()
    elapsed = time.perf_counter() - started
    outcomes = [_outcome(r, labels[r.index], store, warnings, models) for r in results]
    failures = [o for o in outcomes if o.result.error is not None]
    uncached = [o for o in outcomes if o.uncached is not None]
    not_cacheable = [o for o in outcomes if o.not_cacheable is not None]
    summary = {
        "models": len(results),
        "hits": sum(r.from_cache for r in results),
        "compiles": sum(r.ok and not r.from_cache for r in results),
        "failures": len(failures),
        "uncached": len(uncached),
        "not_cacheable": len(not_cacheable),
        "exports": stats.exports,
        "seconds": round(elapsed, 3),
        "results": [
            {"model": str(o.result.model), "ok": o.result.ok, "from_cache": o.result.from_cache,
             "seconds": round(o.result.seconds, 3),
             "warmed_up": bool(o.result.compiled and o.result.compiled.get_property("WARMED_UP")),
             "warmup_seconds": round(o.result.warmup_seconds, 3),
             "error": None if o.result.error is None else f"{type(o.result.error).__name__}: {o.result.error}",
             "cached": o.cached, "not_cacheable": o.not_cacheable, "not_cached": o.uncached}
            for o in outcomes
        ],
    }
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        _print_table(
            [[o.label, o.status, f"{o.result.seconds:.2f}s", _warmed(o.result)] for o in outcomes],
            ["model", "result", "time", "warm-up"],
        )
        extra = "".join(f", {n} {what}" for n, what in ((len(uncached), "not cached"),
                                                        (len(not_cacheable), "not cacheable")) if n)
        print(f"\n{_count(len(results), 'model')}: {summary['hits']} from cache, {summary['compiles']} compiled, "
              f"{len(failures)} failed{extra}, in {elapsed:.2f}s (cache: {printable(args.cache_dir)})")
    for o in failures:
        print(f"error: {printable(o.result.model)}: {printable(o.result.error)}", file=sys.stderr)
    for o in uncached:
        level = "warning" if args.allow_uncached else "error"
        print(f"{level}: {printable(o.result.model)}: compiled, but left no cache entry: {printable(o.uncached)}",
              file=sys.stderr)
    for o in not_cacheable:
        print(f"note: {printable(o.result.model)}: not cacheable: {printable(o.not_cacheable)}", file=sys.stderr)
    if uncached and not args.allow_uncached:
        print(f"aioov: {_count(len(uncached), 'model')} compiled without a cache entry; "
              "--allow-uncached accepts that", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED if failures else EXIT_OK


def _devices(args: argparse.Namespace) -> int:
    core = Core()
    rows: list[dict[str, Any]] = []
    for family in core._devices.families():
        device = core._devices.get(family)
        rows.append({
            "device": family,
            "available": device.available(),
            "full_name": device.full_name(),
            "capabilities": device.capabilities(),
            "reason": device.unavailable_reason,
        })
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        _print_table(
            [[r["device"], "yes" if r["available"] else "no", r["full_name"],
              " ".join(r["capabilities"]), r["reason"] or ""] for r in rows],
            ["device", "available", "name", "capabilities", "why not"],
        )
    return EXIT_OK


def _cache_stats(store: CacheStore, args: argparse.Namespace) -> int:
    """From the cache's summary (O(1), #45); ``--scan`` reads every entry (and rebuilds it)."""
    kept = store.bookkeeping()
    stats: dict[str, Any] = {"cache_dir": str(store.root)}
    if args.scan:
        info = store.scan(_progress("stats", "read"))
        broken = sum(e.problem is not None for e in info.entries)
        with contextlib.suppress(OSError):
            store.refresh(broken=broken)
        stats.update(entries=len(info.entries), bytes=info.size, broken=broken,
                     not_cacheable=sum(e.not_cacheable is not None for e in info.entries), checked=time.time(),
                     oldest_use=min((e.last_used for e in info.entries), default=0),
                     newest_use=max((e.last_used for e in info.entries), default=0))
    else:
        totals = store.totals()
        stats.update(entries=totals.entries, bytes=totals.bytes, broken=totals.broken, not_cacheable=totals.markers,
                     checked=totals.checked or None, oldest_use=None, newest_use=None)
    stats.update(incomplete=kept.temp_dirs, bookkeeping=kept.as_dict())
    if args.json:
        print(json.dumps(stats, indent=1))
        return EXIT_OK
    said = "? (aioov cache verify checks every entry)" if stats["broken"] is None else str(stats["broken"])
    if stats["broken"] is not None and not args.scan:
        said += f" (at the last check, {_when(stats['checked'])})"
    fields = [
        ("cache dir", stats["cache_dir"]),
        ("entries", f"{stats['entries']} ({human_size(stats['bytes'])})"),
        ("broken", said),
        ("not cacheable", f"{_count(stats['not_cacheable'], 'model')} (markers)"),
        ("incomplete", _count(stats["incomplete"], "temp dir")),
        ("bookkeeping", f"{_count(kept.key_locks, 'key lock')}, {_count(kept.hash_locks, 'hash lock')}, "
                        f"{_count(kept.index_records, 'index record')}, {_count(kept.size_markers, 'size marker')}, "
                        f"{_count(kept.run_folders, 'run folder')}"),
    ]
    if args.scan:
        fields.append(("last used", f"{_when(stats['oldest_use'])} .. {_when(stats['newest_use'])}"))
    _print_fields(fields)
    return EXIT_OK


def _progress(action: str, verb: str) -> Callable[[int, int], None]:
    """A progress callback for long runs over the entries: a line on stderr every
    ``PROGRESS_SECONDS`` (a run shorter than that prints none)."""
    last = time.monotonic()

    def report(done: int, total: int) -> None:
        nonlocal last
        if time.monotonic() - last >= PROGRESS_SECONDS:
            last = time.monotonic()
            print(f"aioov cache {action}: {done:,} of {total:,} entries {verb} ({done / max(total, 1):.0%})",
                  file=sys.stderr, flush=True)

    return report


def _cache_ls(store: CacheStore, args: argparse.Namespace) -> int:
    """From the cache's summary (#45); ``--scan`` reads every entry, and shows what is wrong."""
    entries = store.scan(_progress("ls", "read")).entries if args.scan else store.listing()
    entries.sort(key=lambda e: e.last_used, reverse=True)
    try:
        runs = set(os.listdir(store.sentinels.root))  # only these keys can have crash records
    except OSError:
        runs = set()
    crashed = {e.key: store.sentinels.crashed(e.key) if e.key in runs else {} for e in entries}
    if args.json:
        print(json.dumps([{**_entry_json(e), "crashed": crashed[e.key]} for e in entries], indent=1))
        return EXIT_OK
    _print_table(
        [[e.key[:16], e.device, "not cacheable" if e.not_cacheable else human_size(e.size), _when(e.last_used),
          e.problem or (e.source or "-") + (f" ({e.not_cacheable})" if e.not_cacheable else "")
          + "".join(f" ({variant} blob killed a process)" for variant in crashed[e.key])]
         for e in entries],
        ["key", "device", "size", "last used", "model"],
    )
    return EXIT_OK


def _cache_verify(store: CacheStore, args: argparse.Namespace) -> int:
    secret = normalize({"CACHE_HMAC_KEY": os.environ.get("AIOOV_CACHE_HMAC_KEY")})["CACHE_HMAC_KEY"]
    mac_keys = auth.keys_of(secret)  # then MACs are checked too
    mac_key = mac_keys[0] if mac_keys else None
    bad: list[dict[str, str]] = []
    foreign: list[str] = []
    checked = 0
    keys = list(store.keys())
    progress = _progress("verify", "checked")
    for key in keys:
        checked += 1
        progress(checked, len(keys))
        lock = store.lock(key)
        try:
            lock.acquire(30, shared=True)  # an entry being pruned is not "bad"
        except Exception:
            pass
        try:
            problem = store.check(key, mac_keys) or _crashed(store, key, remember=not args.dry_run)
        finally:
            lock.release()
        if problem == auth.NOT_MINE and not args.delete_foreign:
            foreign.append(key)  # not this key's to judge: left as it is
        elif problem:
            bad.append({"key": key, "problem": problem})
    if mac_key is not None:  # a forged stat index record could map a model to another's entry
        for record in store.index.records():
            checked += 1
            problem = store.index.judge(record, mac_keys)
            if problem == auth.NOT_MINE and not args.delete_foreign:
                foreign.append(f"index/{record.name}")  # as for entries: another key's (a rotation)
            elif problem:
                bad.append({"key": f"index/{record.name}", "problem": problem})
    if not args.dry_run:
        for item in bad:
            if item["key"].startswith("index/"):
                (store.index.root / item["key"].removeprefix("index/")).unlink(missing_ok=True)
            else:
                store.quarantine(item["key"], item["problem"])
        with contextlib.suppress(OSError):  # the summary, made anew from the entries (#45)
            store.refresh(broken=sum(not item["key"].startswith("index/") for item in bad))
    if args.json:
        print(json.dumps({"checked": checked, "bad": bad, "removed": not args.dry_run, "foreign": foreign},
                         indent=1))
    else:
        for item in bad:
            action = "found" if args.dry_run else "removed"
            print(f"{action} bad entry {printable(item['key'][:16])}: {printable(item['problem'])}")
        records = sum(key.startswith("index/") for key in foreign)
        if len(foreign) > records:
            print(f"left {_count(len(foreign) - records, 'entry', 'entries')} signed with another key or forged "
                  "(never served; --delete-foreign removes them)")
        if records:
            print(f"left {_count(records, 'stat index record')} signed with another key "
                  "or forged (never used; --delete-foreign removes them)")
        print(f"verified {_count(checked, 'entry', 'entries')}: {len(bad)} bad")
    return EXIT_FAILED if bad or foreign else EXIT_OK


def _crashed(store: CacheStore, key: str, *, remember: bool) -> str | None:
    """Why ``key``'s entry is bad if a process died running it (``_cache/sentinel``); with
    ``remember``, its variant is remembered as one that crashes, as a hit would."""
    fatal = store.sentinels.fatal(key, store.info(key).variant or "", claim=remember)
    return f"a process died running it: {fatal.describe()}" if fatal else None


def _cache_prune(store: CacheStore, args: argparse.Namespace) -> int:
    if args.max_size is None and args.older_than is None:
        print("aioov cache prune: give --max-size and/or --older-than", file=sys.stderr)
        return EXIT_USAGE
    with _reported_here("could not prune entry"):
        removed = store.prune(max_size=args.max_size, older_than=args.older_than, dry_run=args.dry_run,
                              progress=_progress("prune", "read"),
                              removing=None if args.dry_run else _progress("prune", "removed"))
    leftovers = [] if args.dry_run else store.clean_tmp()
    failed = [{**_entry_json(e), "error": why} for e, why in removed.failed]
    _say_failed("prune", failed)
    if args.json:
        print(json.dumps({"removed": [_entry_json(e) for e in removed], "dry_run": args.dry_run,
                          "temp_dirs_removed": len(leftovers), "failed": failed}, indent=1))
    else:
        verb = "would remove" if args.dry_run else "removed"
        for e in removed:
            print(f"{verb} {e.key[:16]} {human_size(e.size):>10}  {printable(e.source or '-')}")
        print(f"{verb} {_count(len(removed), 'entry', 'entries')}, {human_size(sum(e.size for e in removed))}"
              + (f"; {_count(len(failed), 'entry', 'entries')} could not be removed" if failed else ""))
    return EXIT_FAILED if failed else EXIT_OK


def _cache_clear(store: CacheStore, args: argparse.Namespace) -> int:
    if not args.yes:
        print("aioov cache clear: this deletes every entry; add --yes to confirm", file=sys.stderr)
        return EXIT_USAGE
    with _reported_here("could not clear entry"):
        removed = store.clear(_progress("clear", "removed"))
    failed: list[dict[str, Any]] = []
    for key in list(store.keys()):  # left behind: in use (skipped), or not removable: learn why
        try:
            if store.remove(key):
                store.sentinels.forget(key)  # as clear() does
                removed += 1
        except CacheError as exc:
            failed.append({"key": key, "error": str(exc)})
    _say_failed("clear", failed)
    if args.json:
        print(json.dumps({"removed": removed, "failed": failed}))
    else:
        print(f"removed {_count(removed, 'entry', 'entries')}"
              + (f"; {_count(len(failed), 'entry', 'entries')} could not be removed" if failed else ""))
    return EXIT_FAILED if failed else EXIT_OK


def _say_failed(action: str, failed: list[dict[str, Any]]) -> None:
    """One line on stderr per entry that ``prune``/``clear`` chose but could not remove."""
    for item in failed:
        source = f" (model {printable(item['source'])})" if item.get("source") else ""
        print(f"aioov cache {action}: {printable(item['error'])}{source}", file=sys.stderr)


@contextlib.contextmanager
def _reported_here(message: str) -> Iterator[None]:
    """The store's own warning for an entry it could not remove (``aioov cache: could not
    prune entry ...``) left off stderr meanwhile: the command says it once, in its own line."""

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not (record.name == "aioov.cache" and message in str(record.msg))

    handler, drop = _log_handler, _Filter()
    if handler is not None:
        handler.addFilter(drop)
    try:
        yield
    finally:
        if handler is not None:
            handler.removeFilter(drop)


# -- parser ---------------------------------------------------------------------------------


def _common_options(level: int) -> argparse.ArgumentParser:
    """The options every command takes, before or after it: at ``level`` 0 on the top parser
    with their defaults; below, copies whose default is ``SUPPRESS``, so that a copy not given
    leaves what was given before the command alone. ``-v`` counts at each level (``verbose``,
    ``verbose_1``...): a subcommand's namespace would replace the count, not add to it."""
    top = level == 0
    suppress = argparse.SUPPRESS
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("common options (before or after the command)")
    group.add_argument("--cache-dir", default=None if top else suppress,
                       help="cache directory (default: $AIOOV_CACHE_DIR or the user cache dir)")
    group.add_argument("--json", action="store_true", default=False if top else suppress,
                       help="print machine-readable JSON")
    group.add_argument("-v", "--verbose", action="count", dest="verbose" if top else f"verbose_{level}",
                       default=0 if top else suppress,
                       help="log more on stderr: -v info, -vv debug (default: warnings)")
    group.add_argument("--log-level", type=str.upper, choices=_LOG_LEVELS, default=None if top else suppress,
                       metavar="LEVEL", help=f"aioov's log level on stderr, one of {', '.join(_LOG_LEVELS)}")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aioov", description="Compile ONNX models ahead of time and manage aioov's model cache.",
        formatter_class=argparse.RawDescriptionHelpFormatter, parents=[_common_options(0)],
        epilog="examples:\n  aioov warmup models/ --cache-dir /var/cache/aioov\n"
               "  aioov --cache-dir /var/cache/aioov cache prune --max-size 10G\n\n"
               "exit codes: 0 success, 1 a model or entry failed, 2 bad arguments, 130 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"aioov {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common, common_below = _common_options(1), _common_options(2)

    compiling = argparse.ArgumentParser(add_help=False)
    compiling.add_argument("models", nargs="+", metavar="MODEL_OR_DIR",
                           help="model files, and folders searched for *.onnx files")
    compiling.add_argument("--device", "-d", default="CPU", type=_device,
                           help="device to compile for: CPU (default), GPU, GPU.N, TENSORRT, OPENVINO or AUTO "
                                "(aioov devices lists what is available here)")
    compiling.add_argument("--config", "-c", action="append", default=[], metavar="KEY=VALUE",
                           help="a compile property, e.g. ORT_GRAPH_OPTIMIZATION_LEVEL=EXTENDED")
    compiling.add_argument("--max-concurrency", "-j", type=int, default=None, metavar="N",
                           help="compile at most N models at once (default: the number of cores, at most 8)")
    compiling.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    compiling.add_argument("--warmup", type=int, default=None, metavar="N",
                           help="also run N inferences on made-up inputs after each compile (WARMUP); "
                                "shapes with -c 'WARMUP_SHAPES={\"input\": [1, 128]}'")
    compiling.add_argument("--allow-uncached", action="store_true",
                           help="a model that compiled but left no cache entry is a warning, not a failure "
                                "(by default it fails the command, as an image build's warm-up step should)")

    p = commands.add_parser(
        "compile", parents=[common, compiling],
        help="compile models into the cache; with -o, one model's blob into a directory",
        description="Compile models into the cache, with a summary; with -o, write one model's blob "
                    "to a new directory instead (for Core.import_model). Without -o this is 'warmup'.",
    )
    p.add_argument("--output", "-o", type=Path, help="write one model's blob to this new directory instead")
    commands.add_parser(
        "warmup", parents=[common, compiling],
        help="the same as compile without -o (the name image builds use)",
        description="The same as 'compile' without -o: compile every model given, and every *.onnx "
                    "file of the folders given, into the cache, with a summary. It runs no inference "
                    "unless --warmup N asks for it. Exits 1 where a model failed or left no cache "
                    "entry (unless --allow-uncached); a model that is not cacheable is reported but "
                    "is no failure.",
    )
    commands.add_parser("devices", parents=[common], help="list devices and their capabilities")

    cache = commands.add_parser("cache", parents=[common], help="inspect and manage the cache").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = cache.add_parser("stats", parents=[common_below], help="entries, size, leftovers")
    p.add_argument("--scan", action="store_true",
                   help="read every entry (slow on a large cache) instead of the cache's summary")
    p = cache.add_parser("ls", parents=[common_below], help="list entries, most recently used first")
    p.add_argument("--scan", action="store_true",
                   help="read every entry's manifest (slow on a large cache): also shows what is wrong with it")
    p = cache.add_parser("verify", parents=[common_below], help="check every entry's checksums; remove bad ones")
    p.add_argument("--dry-run", action="store_true", help="report only")
    p.add_argument("--delete-foreign", action="store_true",
                   help="with AIOOV_CACHE_HMAC_KEY: also remove entries signed under none of its keys")
    p = cache.add_parser("prune", parents=[common_below], help="remove least recently used entries")
    p.add_argument("--max-size", type=_size, help="keep the cache under this size, e.g. 10G")
    p.add_argument("--older-than", type=parse_duration, help="remove entries unused for this long, e.g. 30d")
    p.add_argument("--dry-run", action="store_true", help="show what would be removed")
    p = cache.add_parser("clear", parents=[common_below], help="remove every entry")
    p.add_argument("--yes", action="store_true", help="confirm")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``aioov`` command; returns its exit code. Ctrl-C ends it with one line and 130."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("aioov: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cache_dir is None:
        args.cache_dir = default_cache_dir()
    _configure_logging(args)
    try:
        if args.command == "devices":
            return _devices(args)
        if args.command == "cache":
            store = CacheStore(args.cache_dir)
            if not store.root.is_dir():
                print(f"aioov: no cache at {printable(store.root)}", file=sys.stderr)
                return EXIT_FAILED
            if not store.is_cache() and any(store.root.iterdir()):  # never delete in a folder that is not ours
                print(f"aioov: {printable(store.root)} is not an aioov cache (no CACHEDIR.TAG, no v1/)",
                      file=sys.stderr)
                return EXIT_FAILED
            handler = {"stats": _cache_stats, "ls": _cache_ls, "verify": _cache_verify,
                       "prune": _cache_prune, "clear": _cache_clear}[args.action]
            try:
                store.check_tree()
                return handler(store, args)
            except OSError as exc:
                print(f"aioov: {printable(exc)}", file=sys.stderr)
                return EXIT_FAILED
        if args.max_concurrency is not None and args.max_concurrency < 1:
            parser.error("--max-concurrency must be >= 1")
        return anyio.run(_compile if args.command == "compile" else _warmup, args)
    except PropertyError as exc:
        print(f"aioov: {printable(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except AioovError as exc:
        print(f"aioov: {printable(exc)}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
