"""The README's python code blocks run as written (offline, on the bundled model).

Blocks run in order in one namespace, as a reader would paste them. A block preceded by an html
comment `<!-- not-run: REASON -->` (e.g. it needs a hub checkpoint) is skipped with that reason.
A block followed by a ```text block must print exactly that text.
"""

import contextlib
import io
import linecache
import re
from pathlib import Path

import pytest
from conftest import needs_toy

# The README's examples run on the bundled toy, a Qwen3.5 checkpoint (transformers 5.5 on).
pytestmark = needs_toy

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.M | re.S)
_NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.*?)\s*-->\s*$", re.S)


def blocks(text: str):
    """[(id, code, skip reason or None, expected output or None)] for each ```python block."""
    found, fences = [], list(_FENCE.finditer(text))
    for i, m in enumerate(fences):
        if m.group(1) != "python":
            continue
        before = text[: m.start()].rstrip()
        heading = re.findall(r"^#+ (.+)$", _FENCE.sub("", before + "\n"), re.M)  # not `# comments` in code
        skip = _NOT_RUN.search(before[-300:])
        nxt = fences[i + 1] if i + 1 < len(fences) else None
        expected = (
            nxt.group(2)
            if nxt is not None and nxt.group(1) == "text" and not text[m.end() : nxt.start()].strip()
            else None
        )
        section = heading[-1] if heading else "top"
        n = sum(1 for b in found if b[0].startswith(section))
        found.append((f"{section} #{n + 1}", m.group(2), skip.group(1) if skip else None, expected))
    return found


BLOCKS = blocks(README.read_text())
_NAMESPACE: dict = {"__name__": "__readme__"}


def test_the_quickstart_is_runnable_and_marked_blocks_say_why():
    runnable = [b for b in BLOCKS if b[2] is None]
    assert any(b[0].startswith("Quickstart") for b in runnable)
    assert all(b[2] for b in BLOCKS if b[2] is not None)  # a reason is given


@pytest.mark.parametrize("name, code, skip, expected", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_readme_block(name, code, skip, expected, monkeypatch):
    if skip:
        pytest.skip(f"README marks it not-run: {skip}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = io.StringIO()
    filename = f"README.md [{name}]"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)  # nnsight reads `with` bodies back
    with contextlib.redirect_stdout(out):
        exec(compile(code, filename, "exec"), _NAMESPACE)
    if expected is not None:
        assert out.getvalue().strip() == expected.strip()
