"""Generate the tables of the README and of the documentation site from the registries:
`python -m gdn_intervene._docs` rewrites the blocks between `<!-- NAME:begin -->` and
`<!-- NAME:end -->` markers in README.md and in every page under docs/."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from .families import FAMILIES, UNSUPPORTED
from .sites import SITES, Fires, Owner


def site_table() -> str:
    rows = ["| site (under `linear_attn`) | output | meaning |", "|---|---|---|"]
    for f in FAMILIES:
        names = ", ".join(f"`{p}`" for p in f.projections)
        rows.append(f"| HF's projections ({f.name}) | as HF | {names} |")
    for s in SITES:
        owner = " (HF's module)" if s.owner is Owner.HF else ""
        shape = f"`{s.shape_str()}`" + "".join(f"; {m.value.upper()}: `{s.shape_str(m)}`" for m in s.shapes)
        fires = "" if s.fires is Fires.PER_CALL else f" (fires {s.fires.value})"
        rows.append(f"| `{s.name}`{owner} | {shape} | {s.meaning}{fires} |")
    return "\n".join(rows)


def family_table() -> str:
    rows = ["| family | mixer | layout | HF classes | projections | norm / output |", "|---|---|---|---|---|---|"]
    for f in FAMILIES:
        classes = "<br>".join(f"`{name}`" for _, name in f.classes)
        proj = ", ".join(f"`{p}`" for p in f.projections)
        extra = f"; beta x2 when `{f.neg_eigval_attr}`" if f.neg_eigval_attr else ""
        extra += f"; {f.notes}" if f.notes else ""
        where = f" (under `{f.parent}`)" if f.parent != "linear_attn" else ""
        rows.append(
            f"| {f.name} | {f.mixer.value} | {f.layout}{extra} | {classes} | {proj} | "
            f"`{f.hf_names['norm']}` / `{f.hf_names['out_proj']}`{where} |"
        )
    for name, why in UNSUPPORTED.items():
        rows.append(f"| (unsupported) | | | `{name}` | {why} | |")
    return "\n".join(rows)


TABLES = {"sites": site_table, "families": family_table}


def render(text: str) -> str:
    for name, fn in TABLES.items():
        pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
        text = pattern.sub(lambda m, fn=fn: m.group(1) + fn() + "\n" + m.group(2), text)
    return text


def main(*paths: str) -> int:
    """Render `paths` (default README.md and docs/**/*.md, from the current directory)."""
    files = [Path(p) for p in paths] or [Path("README.md"), *sorted(Path("docs").rglob("*.md"))]
    for p in files:
        text = p.read_text()
        if (new := render(text)) != text:
            p.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
