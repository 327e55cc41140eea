"""The docs stay navigable: every relative link in README and docs/ points at a file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import aioov

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    for target in LINK.findall(page.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_public_names_are_exported_and_documented() -> None:
    """Like httpx's test_exported_members: __all__ is the public surface, each with a docstring."""
    public = sorted(name for name in vars(aioov) if not name.startswith("_") and name not in {"cli", "testing"})
    assert sorted(aioov.__all__) == sorted(set(public) | {"__version__"})
    for name in aioov.__all__:
        obj = getattr(aioov, name)
        if isinstance(obj, type):
            assert obj.__module__ == "aioov", name
            assert obj.__doc__, f"{name} has no docstring"


def test_every_doc_page_is_linked_from_the_index() -> None:
    index = (ROOT / "docs" / "index.md").read_text() + (ROOT / "README.md").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        if page.name != "index.md":
            assert page.name in index, f"docs/{page.name} is not linked from docs/index.md or README"


def test_api_reference_is_up_to_date() -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_api_docs.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
