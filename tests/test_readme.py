"""The README's code blocks run as printed (offline, on the bundled model) and print what it
shows, under the rules of tests/test_docs.py: a block runs in a fresh namespace unless its first
line says `# Continues "HEADING".`; a ```text block after a block is its output; `gdn-intervene`
commands in bash blocks run; `<!-- not-run: REASON -->` skips a block, saying why.
"""

from pathlib import Path

import pytest
from conftest import needs_toy
from test_docs import check_block, page_blocks, text_blocks

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = page_blocks(README)


def blocks(text: str):
    """[(id, code, skip reason or None, expected output or None)] for each ```python block of a
    README text (tests/test_recipes.py compares its recipes with the README's blocks)."""
    found = text_blocks(text, "README.md")
    return [(b.id, b.code, b.skip, b.expected) for b in found if b.lang == "python"]


def test_the_tour_is_runnable_and_marked_blocks_say_why():
    runnable = [b for b in BLOCKS if b.skip is None]
    assert {"Read a site", "Edit beta", "The state at a position", "Trace your own checkpoint"} <= {
        b.heading for b in runnable
    }
    assert all(b.skip.strip() for b in BLOCKS if b.skip is not None)  # a reason is given
    for b in BLOCKS:
        if b.continues is not None:
            assert any(x.heading == b.continues and x.index < b.index for x in BLOCKS), b.id


def test_the_readme_is_a_landing_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 320, "the README is a landing page: move details to docs/"
    for heading in ("## Install", "## Two commands", "## A five-minute tour", "## Documentation"):
        assert f"\n{heading}\n" in text, heading


@needs_toy
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block(block, monkeypatch):
    check_block(block, BLOCKS, monkeypatch)
