"""What the serving process and a builder process say to each other.

One ``BuildJob`` is one JSON line on the builder's stdin; its ``BuildReply`` is one JSON line
back (a ``progress`` line may come first: the builder's first session exists). Both sides
import this module and nothing else of each other. ``VERSION`` changes whenever a field's
meaning does: a builder refuses a job of another version (an upgrade under a running
application) instead of misreading it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

__all__ = ("PARENT_ENV", "VERSION", "BuildJob", "BuildReply")

VERSION = 1
#: the pid of the process that started the builder, in its environment (it dies with it)
PARENT_ENV = "AIOOV_BUILDER_PARENT"

Shapes = dict[str, list[int]]


@dataclass(frozen=True)
class BuildJob:
    """Write one variant of one blob into ``tmp`` and check it."""

    #: the source model's file (a serving process writes in-memory models to a file first)
    model: str
    #: the directory the blob is written in (an entry being made, in the cache's tmp/)
    tmp: str
    key: str
    #: the blob format's ``kind`` (``_devices.blob_format`` finds it) and which of its variants
    blob: str
    variant: str
    providers: list[tuple[str, dict[str, str]]]
    #: what shapes the graph (``ORT_SESSION_OPTIONS`` only changes how it runs: not here)
    opt_level: str = "ALL"
    session_config: dict[str, str] = field(default_factory=dict)
    custom_ops: list[str] = field(default_factory=list)
    free_dimensions: dict[str, int] = field(default_factory=dict)
    #: inputs the check runs on besides the made-up ones: ``WARMUP_SHAPES``/``VALUES``, ``CHECK_SHAPES``
    shapes: Shapes = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    check_shapes: list[Shapes] = field(default_factory=list)
    #: nobody waits for it: the builder lowers its priority for good
    background: bool = False
    #: the caller's compile, in seconds, where the model's worth is judged: a blob whose timed
    #: load would not save enough of it is reported "not worth" before its checks (``_worth``)
    compile_seconds: float | None = None

    def to_line(self) -> str:
        return json.dumps({"version": VERSION, **asdict(self)}) + "\n"

    @classmethod
    def from_line(cls, line: str) -> BuildJob:
        """The job on ``line``; ValueError for another version or a malformed job."""
        data = json.loads(line)
        if not isinstance(data, dict) or data.pop("version", None) != VERSION:
            raise ValueError(f"a build job of another aioov (protocol {VERSION} expected)")
        job = cls(**_known(cls, data))
        return replace(job, providers=[(name, dict(opts)) for name, opts in job.providers])


@dataclass(frozen=True)
class BuildReply:
    """What became of a job. ``stage``: "check" when the blob itself failed (the parent
    remembers it), "export" when writing it did (the disk, the source: tried again later),
    "not worth" when its hit would not save enough of the job's ``compile_seconds``."""

    ok: bool
    reason: str | None = None
    stage: str | None = None
    #: "ran and matched", or "load only" (outputs that differ between two runs of the source)
    check: str | None = None
    #: why the outputs were not compared (the source's outputs differ between runs, ...)
    skipped: str | None = None
    checked: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    #: how long the blob took to load as a hit (and as an instant hit), wall and CPU seconds
    load_seconds: float | None = None
    load_cpu_seconds: float | None = None
    instant_load_seconds: float | None = None
    instant_load_cpu_seconds: float | None = None
    export_seconds: float | None = None
    check_seconds: float | None = None

    def to_line(self) -> str:
        return json.dumps(asdict(self)) + "\n"

    @classmethod
    def from_line(cls, line: str) -> BuildReply | None:
        """The reply on ``line``; None for a progress line (the builder's first session exists)."""
        data = json.loads(line)
        if "progress" in data:
            return None
        return cls(**_known(cls, data))

    @staticmethod
    def progress_line(seconds: float) -> str:
        return json.dumps({"progress": "compiled", "seconds": seconds}) + "\n"

    def record(self) -> dict[str, Any]:
        """What the entry's manifest keeps of the check (its ``build`` record, less the variant)."""
        return {name: getattr(self, name) for name in _RECORDED}


_RECORDED = ("check", "skipped", "checked", "left_out", "load_seconds", "instant_load_seconds", "load_cpu_seconds",
             "export_seconds", "check_seconds")


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``cls`` in ``data`` (a newer peer may add fields this side ignores)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}
