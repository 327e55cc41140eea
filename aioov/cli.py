"""The ``aioov`` command: compile ahead of time, warm up, and manage a cache directory.

    aioov compile model.onnx --device CPU --cache-dir /var/cache/aioov
    aioov warmup models/ --cache-dir /var/cache/aioov
    aioov cache ls|stats|verify|prune|clear --cache-dir /var/cache/aioov
    aioov devices

Exit codes: 0 success, 1 a model or entry failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from ._bulk import BulkProgress
from ._cache import auth
from ._cache.store import CacheStore, EntryInfo
from ._core import Core
from ._errors import AioovError, PropertyError
from ._properties import normalize, parse_size
from ._version import __version__

__all__ = ("default_cache_dir", "main")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


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
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def _models_in(items: Sequence[str]) -> list[str]:
    """Expand directories into the ``*.onnx`` files below them."""
    found: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found.extend(str(p) for p in sorted(path.rglob("*.onnx")))
        else:
            found.append(str(path))
    return found


class _Bar:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total = total
        self.quiet = quiet
        self.tty = sys.stderr.isatty()

    def __call__(self, event: BulkProgress) -> None:
        if self.quiet:
            return
        result = event.current
        status = "cached" if result.from_cache else ("FAILED" if result.error else "compiled")
        name = Path(str(result.model)).name
        if self.tty:
            filled = int(30 * event.done / max(1, event.total))
            bar = "#" * filled + "-" * (30 - filled)
            end = "\n" if event.done == event.total else ""
            sys.stderr.write(f"\r[{bar}] {event.done}/{event.total} {status:8} {name[:40]:40}{end}")
        else:
            sys.stderr.write(f"[{event.done}/{event.total}] {status} {name} ({result.seconds:.2f}s)\n")
        sys.stderr.flush()


# -- commands -----------------------------------------------------------------------------


async def _compile(args: argparse.Namespace) -> int:
    config = _config(args.config, args.warmup)
    models = _models_in(args.models)
    if args.output is not None:
        if len(models) != 1:
            print("aioov compile: -o/--output takes exactly one model", file=sys.stderr)
            return EXIT_USAGE
        async with Core() as core:
            await core.export_model(models[0], args.output, args.device, config)
        print(f"wrote {args.output}")
        return EXIT_OK
    return await _warmup(args, config=config, models=models)


async def _warmup(
    args: argparse.Namespace, *, config: dict[str, object] | None = None, models: list[str] | None = None
) -> int:
    config = _config(args.config, args.warmup) if config is None else config
    models = _models_in(args.models) if models is None else models
    if not models:
        print("aioov: no models found", file=sys.stderr)
        return EXIT_USAGE
    store = CacheStore(args.cache_dir)
    if store.root.is_dir() and any(store.root.iterdir()) and not store.is_cache():
        print(f"aioov: {store.root} is not empty and not an aioov cache; give a new or empty --cache-dir",
              file=sys.stderr)
        return EXIT_USAGE
    started = time.perf_counter()
    async with Core(cache_dir=args.cache_dir, max_concurrent_compiles=args.max_concurrency) as core:
        results = await core.compile_all(
            models, args.device, config, progress=_Bar(len(models), args.json or args.quiet)
        )
        await core.wait_exports()
        stats = core.cache_stats
    elapsed = time.perf_counter() - started
    failures = [r for r in results if not r.ok]
    summary = {
        "models": len(results),
        "hits": sum(r.from_cache for r in results),
        "compiles": sum(r.ok and not r.from_cache for r in results),
        "failures": len(failures),
        "exports": stats.exports,
        "seconds": round(elapsed, 3),
        "results": [
            {"model": str(r.model), "ok": r.ok, "from_cache": r.from_cache, "seconds": round(r.seconds, 3),
             "warmed_up": bool(r.compiled and r.compiled.get_property("WARMED_UP")),
             "warmup_seconds": round(r.warmup_seconds, 3),
             "error": None if r.error is None else f"{type(r.error).__name__}: {r.error}"}
            for r in results
        ],
    }
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        _print_table(
            [[Path(str(r.model)).name, "cached" if r.from_cache else ("FAILED" if r.error else "compiled"),
              f"{r.seconds:.2f}s", _warmed(r)] for r in results],
            ["model", "result", "time", "warm-up"],
        )
        print(f"\n{summary['models']} models: {summary['hits']} from cache, {summary['compiles']} compiled, "
              f"{summary['failures']} failed, in {elapsed:.2f}s (cache: {args.cache_dir})")
        for r in failures:
            print(f"error: {r.model}: {r.error}", file=sys.stderr)
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
    info = store.scan()
    stats: dict[str, Any] = {
        "cache_dir": str(store.root),
        "entries": len(info.entries),
        "bytes": info.size,
        "broken": sum(e.problem is not None for e in info.entries),
        "not_cacheable": sum(e.not_cacheable is not None for e in info.entries),
        "incomplete": len(info.incomplete),
        "oldest_use": min((e.last_used for e in info.entries), default=0),
        "newest_use": max((e.last_used for e in info.entries), default=0),
    }
    if args.json:
        print(json.dumps(stats, indent=1))
    else:
        print(f"cache dir:   {stats['cache_dir']}")
        print(f"entries:     {stats['entries']} ({human_size(info.size)})")
        print(f"broken:      {stats['broken']}")
        print(f"not cacheable: {stats['not_cacheable']} models (markers)")
        print(f"incomplete:  {stats['incomplete']} temp dirs")
        print(f"last used:   {_when(stats['oldest_use'])} .. {_when(stats['newest_use'])}")
    return EXIT_OK


def _cache_ls(store: CacheStore, args: argparse.Namespace) -> int:
    entries = sorted(store.scan().entries, key=lambda e: e.last_used, reverse=True)
    crashed = {e.key: store.sentinels.crashed(e.key) for e in entries}
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
    secret = os.environ.get("AIOOV_CACHE_HMAC_KEY")
    mac_key = auth.key_of(secret)  # then MACs are checked too
    bad: list[dict[str, str]] = []
    checked = 0
    for key in list(store.keys()):
        checked += 1
        lock = store.lock(key)
        try:
            lock.acquire(30, shared=True)  # an entry being pruned is not "bad"
        except Exception:
            pass
        try:
            problem = store.check(key, mac_key) or _crashed(store, key, remember=not args.dry_run)
        finally:
            lock.release()
        if problem:
            bad.append({"key": key, "problem": problem})
    if mac_key is not None:  # a forged stat index record could map a model to another's entry
        for record in store.index.records():
            checked += 1
            if not store.index.check(record, mac_key):
                bad.append({"key": f"index/{record.name}", "problem": "stat index record is not signed with the key"})
    if not args.dry_run:
        for item in bad:
            if item["key"].startswith("index/"):
                (store.index.root / item["key"].removeprefix("index/")).unlink(missing_ok=True)
            else:
                store.quarantine(item["key"], item["problem"])
    if args.json:
        print(json.dumps({"checked": checked, "bad": bad, "removed": not args.dry_run}, indent=1))
    else:
        for item in bad:
            action = "found" if args.dry_run else "removed"
            print(f"{action} bad entry {item['key'][:16]}: {item['problem']}")
        print(f"verified {checked} entries: {len(bad)} bad")
    return EXIT_FAILED if bad else EXIT_OK


def _crashed(store: CacheStore, key: str, *, remember: bool) -> str | None:
    """Why ``key``'s entry is bad if a process died running it (``_cache/sentinel``); with
    ``remember``, its variant is remembered as one that crashes, as a hit would."""
    fatal = store.sentinels.fatal(key, store.info(key).variant or "", claim=remember)
    return f"a process died running it: {fatal.describe()}" if fatal else None


def _cache_prune(store: CacheStore, args: argparse.Namespace) -> int:
    if args.max_size is None and args.older_than is None:
        print("aioov cache prune: give --max-size and/or --older-than", file=sys.stderr)
        return EXIT_USAGE
    removed = store.prune(max_size=args.max_size, older_than=args.older_than, dry_run=args.dry_run)
    leftovers = [] if args.dry_run else store.clean_tmp()
    if args.json:
        print(json.dumps({"removed": [_entry_json(e) for e in removed], "dry_run": args.dry_run,
                          "temp_dirs_removed": len(leftovers)}, indent=1))
    else:
        verb = "would remove" if args.dry_run else "removed"
        for e in removed:
            print(f"{verb} {e.key[:16]} {human_size(e.size):>10}  {e.source or '-'}")
        print(f"{verb} {len(removed)} entries, {human_size(sum(e.size for e in removed))}")
    return EXIT_OK


def _cache_clear(store: CacheStore, args: argparse.Namespace) -> int:
    if not args.yes:
        print("aioov cache clear: this deletes every entry; add --yes to confirm", file=sys.stderr)
        return EXIT_USAGE
    removed = store.clear()
    print(json.dumps({"removed": removed}) if args.json else f"removed {removed} entries")
    return EXIT_OK


# -- parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aioov", description="Compile ONNX models ahead of time and manage aioov's model cache.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  aioov warmup models/ --cache-dir /var/cache/aioov\n"
               "  aioov cache prune --max-size 10G --cache-dir /var/cache/aioov",
    )
    parser.add_argument("--version", action="version", version=f"aioov {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", default=None,
                        help="cache directory (default: $AIOOV_CACHE_DIR or the user cache dir)")
    common.add_argument("--json", action="store_true", help="print machine-readable JSON")

    compiling = argparse.ArgumentParser(add_help=False)
    compiling.add_argument("models", nargs="+", metavar="MODEL_OR_DIR")
    compiling.add_argument("--device", "-d", default="CPU")
    compiling.add_argument("--config", "-c", action="append", default=[], metavar="KEY=VALUE",
                           help="a compile property, e.g. ORT_GRAPH_OPTIMIZATION_LEVEL=EXTENDED")
    compiling.add_argument("--max-concurrency", "-j", type=int, default=None)
    compiling.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    compiling.add_argument("--warmup", type=int, default=None, metavar="N",
                           help="run N inferences on made-up inputs after each compile (WARMUP); "
                                "shapes with -c 'WARMUP_SHAPES={\"input\": [1, 128]}'")

    p = commands.add_parser("compile", parents=[common, compiling], help="compile models into the cache")
    p.add_argument("--output", "-o", type=Path, help="write one model's blob to this new directory instead")
    commands.add_parser("warmup", parents=[common, compiling],
                        help="compile every model of folders/lists into the cache, with a summary")
    commands.add_parser("devices", parents=[common], help="list devices and their capabilities")

    cache = commands.add_parser("cache", help="inspect and manage the cache").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    cache.add_parser("stats", parents=[common], help="entries, size, leftovers")
    cache.add_parser("ls", parents=[common], help="list entries, most recently used first")
    p = cache.add_parser("verify", parents=[common], help="check every entry's checksums; remove bad ones")
    p.add_argument("--dry-run", action="store_true", help="report only")
    p = cache.add_parser("prune", parents=[common], help="remove least recently used entries")
    p.add_argument("--max-size", type=_size, help="keep the cache under this size, e.g. 10G")
    p.add_argument("--older-than", type=parse_duration, help="remove entries unused for this long, e.g. 30d")
    p.add_argument("--dry-run", action="store_true", help="show what would be removed")
    p = cache.add_parser("clear", parents=[common], help="remove every entry")
    p.add_argument("--yes", action="store_true", help="confirm")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "cache_dir", "unset") is None:
        args.cache_dir = default_cache_dir()
    try:
        if args.command == "devices":
            return _devices(args)
        if args.command == "cache":
            store = CacheStore(args.cache_dir)
            if not store.root.is_dir():
                print(f"aioov: no cache at {store.root}", file=sys.stderr)
                return EXIT_FAILED
            if not store.is_cache() and any(store.root.iterdir()):  # never delete in a folder that is not ours
                print(f"aioov: {store.root} is not an aioov cache (no CACHEDIR.TAG, no v1/)", file=sys.stderr)
                return EXIT_FAILED
            handler = {"stats": _cache_stats, "ls": _cache_ls, "verify": _cache_verify,
                       "prune": _cache_prune, "clear": _cache_clear}[args.action]
            try:
                store.check_tree()
                return handler(store, args)
            except OSError as exc:
                print(f"aioov: {exc}", file=sys.stderr)
                return EXIT_FAILED
        if args.max_concurrency is not None and args.max_concurrency < 1:
            parser.error("--max-concurrency must be >= 1")
        command = _compile if args.command == "compile" else _warmup
        return anyio.run(command, args)
    except PropertyError as exc:
        print(f"aioov: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AioovError as exc:
        print(f"aioov: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
