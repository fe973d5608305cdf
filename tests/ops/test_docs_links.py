"""Every link in README.md and docs/ stays inside the repository and points at a file that exists.

The docs ship with the code to air-gapped GPU nodes, so they may not send a reader off-site; only the
service's own localhost addresses (what a running deployment answers) are allowed as URLs.
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[2]
MARKDOWN = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])
# [text](target), ![alt](target), [ref]: target, <scheme://...> autolinks and bare URLs.
INLINE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s)>\]`'\"]+", re.IGNORECASE)
LOCAL_HOSTS = re.compile(r"^https?://(localhost|127\.0\.0\.1|0\.0\.0\.0|\[::1\])(:\d+)?(/|$)", re.IGNORECASE)
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)
# The project's working notes live beside the repository, not in it: a reader of the shipped docs has no copy.
OUTSIDE_NOTES = re.compile(r"\bshared/docs/|\b(amskv-method|var-reference|serving-notes|demo-model-notes)\b")


def links(text: str) -> list[str]:
    prose = CODE.sub("", text)  # commands in code spans are not links (they are checked where they run)
    return INLINE.findall(prose) + REFERENCE.findall(prose)


def problems(path: Path, root: Path = REPO) -> list[str]:
    text = path.read_text(encoding="utf-8")
    found = [f"reference to notes outside the repository: {m.group(0)}" for m in OUTSIDE_NOTES.finditer(text)]
    for url in URL.findall(CODE.sub("", text)):
        if not LOCAL_HOSTS.match(url):
            found.append(f"external URL {url}")
    for target in links(text):
        if URL.match(target) or target.startswith(("mailto:", "#")):
            continue  # URLs are checked above; in-page anchors need no file
        file_part = unquote(target.split("#", 1)[0])
        resolved = (path.parent / file_part).resolve()
        if not resolved.is_relative_to(root):
            found.append(f"link leaves the repository: {target}")
        elif not resolved.exists():
            found.append(f"link to a missing file: {target}")
    return found


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_links_stay_in_the_repository(path):
    assert problems(path) == []


def test_checker_flags_external_missing_and_escaping_links(tmp_path):
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    page.write_text("[a](https://example.org/x) [b](missing.md) [c](../../etc/passwd) <http://localhost:8000> "
                    "[d](page.md#top) [e](#anchor) `curl https://in.code/span` see `shared/docs/x.md`\n")
    assert sorted(problems(page, root=tmp_path)) == [
        "external URL https://example.org/x", "link leaves the repository: ../../etc/passwd",
        "link to a missing file: missing.md", "reference to notes outside the repository: shared/docs/"]
