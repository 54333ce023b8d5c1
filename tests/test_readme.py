"""README.md stays short, and every file it (or a page under docs/) points to exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
MAX_LINES = 200

FENCE = re.compile(r"^```.*?^```[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
PATH_CHARS = re.compile(r"[A-Za-z0-9_.\-/]+")
EXTENSIONS = (".md", ".py", ".sh", ".txt", ".toml", ".yaml", ".yml", ".json", ".proto", ".png", ".onnx")
TOP_LEVEL_NAMES = {"Makefile", "Dockerfile"}
MADE_AT_RUN_TIME = ("bundles/", "runs/", ".venv/", "build/")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")  # NAME, VERSION, DIR, OUT_DIR


def prose(text: str) -> str:
    """The text without its fenced code blocks (commands and examples, not references)."""
    return FENCE.sub("", text)


def looks_like_path(token: str) -> bool:
    """A repository path: no spaces (a command line), no URL, no placeholder, nothing made at run time."""
    token = token.split("#", 1)[0]
    if not token or not PATH_CHARS.fullmatch(token) or token.startswith(("/", "..", "~", "-")):
        return False
    if (token.rstrip("/") + "/").startswith(MADE_AT_RUN_TIME):
        return False
    if any(PLACEHOLDER.match(part) for part in token.split("/")):
        return False
    return "/" in token or token.endswith(EXTENSIONS) or token in TOP_LEVEL_NAMES


def named_paths(text: str) -> set[str]:
    """Backticked tokens and link targets of the prose that look like repository paths, and the words
    of code blocks that start with one of the repository's top-level folders (deploy/k8s/overlays/gpu)."""
    body = prose(text)
    links = [t for t in LINK.findall(body) if not re.match(r"[a-z]+:", t)]
    named = {t.split("#", 1)[0] for t in INLINE_CODE.findall(body) + links if looks_like_path(t)}
    words = re.split(r"[\s=]+", "\n".join(FENCE.findall(text)))
    return named | {w for w in words if looks_like_path(w) and "/" in w and (ROOT / w.split("/")[0]).is_dir()}


def layout_paths(text: str) -> list[str]:
    """The first word of each line of the code block under '## Layout'."""
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"^```\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    assert block, "README.md: the Layout section has no code block"
    return [line.split()[0] for line in block.group(1).splitlines() if line.strip()]


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of the headings of `page`: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", prose(page.read_text()), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def broken_links(page: Path) -> list[str]:
    """Relative markdown links of `page` whose file, or heading after '#', does not exist."""
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        name, _, anchor = target.partition("#")
        linked = page.parent / name if name else page
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
            broken.append(target)
    return broken


def test_readme_is_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_LINES, f"README.md has {lines} lines; keep it at {MAX_LINES} or fewer (move detail to docs/)"


def test_paths_named_in_readme_exist() -> None:
    paths = named_paths(README.read_text())
    assert {"models/default", "deploy/k8s/overlays/gpu", "docs/serving.md"} <= paths  # the extraction finds them
    assert sorted(p for p in paths if not (ROOT / p).exists()) == []


def test_layout_paths_exist() -> None:
    paths = layout_paths(README.read_text())
    assert len(paths) >= 10
    assert [p for p in paths if not (ROOT / p).exists()] == []


def test_markdown_links_resolve() -> None:
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    assert {page.name: broken_links(page) for page in pages} == {page.name: [] for page in pages}


def test_extraction_catches_a_renamed_file() -> None:
    text = "See `engine/no_such_file.py`, [the guide](docs/missing.md) and `Makefile`; not `NAME/VERSION/`,\n"
    text += "`bundles/default`, `make run`, [a site](https://example.com/a.md) or `../shared/data`.\n"
    text += "```sh\nkubectl apply -k deploy/k8s/overlays/renamed  # calls nmt.v1.TranslationService/Translate\n```\n"
    found = {"engine/no_such_file.py", "docs/missing.md", "Makefile", "deploy/k8s/overlays/renamed"}
    assert named_paths(text) == found
    assert sorted(p for p in found if not (ROOT / p).exists()) == sorted(found - {"Makefile"})
