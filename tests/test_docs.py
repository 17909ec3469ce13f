"""Every code block of docs/ runs as printed (offline, on the bundled model or tiny models built in
code), and prints what the page shows; tests/test_readme.py does the same for the README.

The rules a page follows, which these tests hold it to:

- A ```python block runs in a fresh namespace, unless its first line says which block it
  continues: `# Continues "HEADING".` (HEADING: a heading above it on the same page, without its
  backticks). It then
  runs in the namespace left by the last block under that heading.
- A ```text block right after a code block is what that block prints, line for line; a line
  `...` in it stands for any number of lines (versions, paths).
- In a ```bash block, each `gdn-intervene ...` command runs (in this process, `cli.main`) and
  must exit 0. The other lines of bash blocks (installs, pytest, mkdocs, the training script)
  are set-up a reader runs once; they do not run here (.ci/run runs the install and the two
  commands; tests/test_examples.py the examples).
- A block preceded by `<!-- not-run: REASON -->` is skipped with that reason (a hub checkpoint,
  a GPU, minutes of CPU).

The blocks of a page run in one temporary working directory, so files a block writes
(`out/...`) are there for the next, and nothing lands in the checkout.
"""

from __future__ import annotations

import contextlib
import io
import linecache
import os
import re
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import needs_toy

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*\n", re.M | re.S)
_NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.*?)\s*-->\s*$", re.S)
_CONTINUES = re.compile(r'\A# Continues "([^"]+)"')
_HEADING = re.compile(r"^#+ (.+?)\s*$", re.M)


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repository root
    index: int  # among the page's runnable-kind blocks (python, bash with a command)
    lang: str
    code: str
    heading: str
    skip: str | None  # the not-run reason
    expected: str | None  # the ```text block after it
    continues: str | None  # the heading whose namespace it continues

    @property
    def id(self) -> str:
        return f"{self.page}: {self.heading} #{self.index}"


def _commands(code: str) -> list[list[str]]:
    """The `gdn-intervene` (or `python -m gdn_intervene`) commands of a bash block, as argv lists."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["gdn-intervene"]:
            out.append(words[1:])
        elif words[:3] == ["python", "-m", "gdn_intervene"]:
            out.append(words[3:])
    return out


def page_blocks(path: Path) -> list[Block]:
    """The python blocks and the bash blocks with a command of one page, in page order."""
    return text_blocks(path.read_text(), str(path.relative_to(ROOT)))


def text_blocks(text: str, page: str) -> list[Block]:
    """The blocks of a page's `text` (see `page_blocks`)."""
    fences, found = list(_FENCE.finditer(text)), []
    for i, m in enumerate(fences):
        lang, code = m.group(1), m.group(2)
        if lang not in ("python", "bash") or (lang == "bash" and not _commands(code)):
            continue
        before = text[: m.start()]
        headings = _HEADING.findall(_FENCE.sub("", before))  # not `# comments` inside code
        skip = _NOT_RUN.search(before.rstrip()[-400:])
        nxt = fences[i + 1] if i + 1 < len(fences) else None
        expected = (
            nxt.group(2)
            if nxt is not None and nxt.group(1) == "text" and not text[m.end() : nxt.start()].strip()
            else None
        )
        cont = _CONTINUES.match(code)
        found.append(
            Block(page, len(found) + 1, lang, code, headings[-1].replace("`", "") if headings else "top",
                  skip.group(1) if skip else None, expected, cont.group(1) if cont else None)
        )  # fmt: skip
    return found


def doc_pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


# ------------------------------------------------------------------ running blocks


class _Runs:
    """Each block runs once per session (namespaces and printed text kept for the blocks that
    continue it); a block whose prerequisite has not run yet runs that first."""

    def __init__(self):
        self.done: dict[tuple[str, int], tuple[dict, str] | BaseException] = {}
        self.dirs: dict[str, str] = {}

    def workdir(self, page: str) -> str:
        if page not in self.dirs:
            self.dirs[page] = tempfile.mkdtemp(prefix="gdn-docs-")
        return self.dirs[page]

    def run(self, block: Block, blocks: list[Block]) -> tuple[dict, str]:
        key = (block.page, block.index)
        if key not in self.done:
            try:
                self.done[key] = self._run(block, blocks)
            except BaseException as e:  # noqa: BLE001 - kept and re-raised for each block that needs it
                self.done[key] = e
        got = self.done[key]
        if isinstance(got, BaseException):
            raise got
        return got

    def _run(self, block: Block, blocks: list[Block]) -> tuple[dict, str]:
        namespace: dict = {"__name__": "__docs__"}
        if block.continues is not None:
            earlier = [
                b for b in blocks if b.index < block.index and b.heading == block.continues and b.lang == "python"
            ]
            if not earlier:
                raise AssertionError(f'{block.id} continues "{block.continues}", which has no python block above it')
            namespace = dict(self.run(earlier[-1], blocks)[0])
        out = io.StringIO()
        cwd = os.getcwd()
        os.chdir(self.workdir(block.page))
        try:
            with contextlib.redirect_stdout(out):
                if block.lang == "python":
                    filename = f"{block.id}"
                    linecache.cache[filename] = (len(block.code), None, block.code.splitlines(True), filename)
                    exec(compile(block.code, filename, "exec"), namespace)  # nnsight reads `with` bodies back
                else:
                    from gdn_intervene import cli

                    for argv in _commands(block.code):
                        rc = cli.main(argv)
                        assert rc == 0, f"gdn-intervene {shlex.join(argv)} exited {rc}"
        finally:
            os.chdir(cwd)
        return namespace, out.getvalue()


RUNS = _Runs()


def matches(expected: str, printed: str) -> bool:
    """`printed` is `expected` line for line, where an expected line `...` stands for any lines."""
    want = [line.rstrip() for line in expected.strip("\n").splitlines()]
    got = [line.rstrip() for line in printed.strip("\n").splitlines()]
    pattern = "".join("(?:.*\n)*?" if line == "..." else re.escape(line) + "\n" for line in want)
    return re.fullmatch(pattern, "".join(line + "\n" for line in got)) is not None


def check_block(block: Block, blocks: list[Block], monkeypatch) -> None:
    if block.skip:
        pytest.skip(f"{block.page} marks it not-run: {block.skip}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, printed = RUNS.run(block, blocks)
    if block.expected is not None:
        assert matches(block.expected, printed), f"printed:\n{printed}\nthe page shows:\n{block.expected}"


# ------------------------------------------------------------------ the docs pages

BLOCKS = {str(p.relative_to(ROOT)): page_blocks(p) for p in doc_pages()}
ALL = [b for bs in BLOCKS.values() for b in bs]


def _newest_release() -> bool:
    """The docs show what the newest supported transformers release prints (older releases run
    the README's blocks, tests/test_readme.py, and the compat subset)."""
    import transformers

    from gdn_intervene._compat import TESTED, parse_version

    return parse_version(transformers.__version__)[:2] >= parse_version(TESTED["transformers"][1])[:2]


@needs_toy
@pytest.mark.parametrize("block", ALL, ids=[b.id for b in ALL])
def test_docs_block(block, monkeypatch):
    if not _newest_release():
        pytest.skip("the docs' blocks print what the newest supported transformers prints")
    check_block(block, BLOCKS[block.page], monkeypatch)


def test_blocks_say_what_they_continue_and_why_they_do_not_run():
    for b in ALL:
        if b.continues is not None:
            assert any(x.heading == b.continues and x.index < b.index for x in BLOCKS[b.page]), b.id
        assert b.skip is None or b.skip.strip(), b.id  # a reason is given
    assert sum(b.skip is None for b in ALL) >= 20  # most blocks run


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    config = (ROOT / "mkdocs.yml").read_text()
    nav = config.split("\nnav:\n", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r"([\w/.-]+\.md)\s*$", nav, re.M))
    pages = {str(p.relative_to(DOCS)) for p in doc_pages()}
    assert listed == pages, f"in the nav only: {sorted(listed - pages)}; not in the nav: {sorted(pages - listed)}"


def test_registry_tables_in_the_docs_are_current():
    from gdn_intervene import _docs

    for p in doc_pages():
        text = p.read_text()
        assert _docs.render(text) == text, f"{p}: tables are stale: run python -m gdn_intervene._docs"
