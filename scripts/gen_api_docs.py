"""Generate docs/api.md from the public API's signatures and docstrings.

    python scripts/gen_api_docs.py          # rewrite docs/api.md
    python scripts/gen_api_docs.py --check  # fail if docs/api.md is out of date (tests run this)
"""

from __future__ import annotations

import inspect
import sys
import types
from pathlib import Path

import aioov

OUT = Path(__file__).resolve().parent.parent / "docs" / "api.md"
#: the special methods worth a line: how an object is built, called and indexed
DUNDERS = ("__init__", "__call__", "__getitem__")


def _doc(obj: object) -> str:
    return inspect.cleandoc(obj.__doc__ or "").strip()


def _signature(obj: object) -> str:
    try:
        return str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "(...)"


def render() -> str:
    lines = ["# API reference", "", "Generated from the docstrings by `scripts/gen_api_docs.py`; do not edit.", ""]
    for name in aioov.__all__:
        obj = getattr(aioov, name)
        if isinstance(obj, types.ModuleType):
            lines += [f"## `aioov.{name}` (module)", "", _doc(obj), "",
                      ", ".join(f"`{member}`" for member in obj.__all__), ""]
            continue
        if not isinstance(obj, type):
            continue
        kind = "exception" if issubclass(obj, BaseException) else "class"
        lines += [f"## `{name}` ({kind})", ""]
        if _doc(obj):
            lines += [_doc(obj), ""]
        if kind == "exception":
            continue
        for attr, member in sorted(vars(obj).items()):
            if attr.startswith("_") and attr not in DUNDERS:
                continue
            if isinstance(member, property):
                lines += [f"- `{attr}` (property): {_doc(member).splitlines()[0] if _doc(member) else ''}"]
            elif inspect.isfunction(member):
                label = "async " if inspect.iscoroutinefunction(member) else ""
                first = _doc(member).split("\n\n")[0].replace("\n", " ") if _doc(member) else ""
                lines += [f"- `{label}{attr}{_signature(member)}`", f"  {first}".rstrip()]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print("docs/api.md is out of date: run python scripts/gen_api_docs.py", file=sys.stderr)
            sys.exit(1)
    else:
        OUT.write_text(text)
