"""A trace's files in one call: the JSON, the figures and the HTML report that `gdn-intervene
demo` and `trace` write, for a result a library user computed.

    from gdn_intervene import outputs, tracing
    trace = tracing.causal_trace(model, clean, corrupt, tokens=labels)
    atp = tracing.attribution_patching(model, clean, corrupt, tokens=labels, answers=trace.answers)
    outputs.write("out/", trace, atp=atp, answer_labels=("v12", "v4"), html=True)

Every JSON written parses with a strict parser (`allow_nan=False`; NaN scores are null).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["write", "write_json"]


def write_json(path, data) -> Path:
    """`data` as strict JSON (no NaN or Infinity: a ValueError instead) at `path`."""
    path = Path(path)
    path.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    return path


def write(
    folder,
    result,
    *,
    atp=None,
    attribution=None,
    attribution_of: str = "the projected output",
    attention: Mapping | None = None,
    answer_labels: Sequence[str] | None = None,
    corrupt_tokens: Mapping[int, str] | None = None,
    record: Mapping | None = None,
    html: bool = False,
    title: str = "gdn_intervene",
) -> list[Path]:
    """Write into `folder` (created if missing) and return the paths, in this order:

    trace.json       `record` (what produced the result, e.g. model and prompts), then
                     `result.to_json()`, with `atp` and their agreement where given
    attribution.png  with `attribution` (an `analysis.Attribution`, what it attributes in
                     `attribution_of`)
    trace.png        every site of `result` (a `tracing.TraceResult`: activation patching, or
                     attribution patching with its verified cells)
    atp.png, atp_scatter.png   with `atp`, an attribution-patching result of the same cells, and
                     its estimates against `result`'s measurements
    report.html      with `html` (needs plotly): the same views, interactive; `attention` adds
                     effective attention ({layer: LayerAttention or M [H, R, T]})

    answer_labels: the (clean, corrupt) answers as text; corrupt_tokens: {position: corrupted
    token} for the figures' tick labels.
    """
    from . import plot

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    data = {**(record or {}), **result.to_json()}
    if atp is not None:
        from .tracing import agreement

        data["attribution_patching"] = atp.to_json()
        data["agreement"] = {k: _finite(v._asdict()) for k, v in agreement(atp, result).items()}
    files = [write_json(out / "trace.json", data)]
    if attribution is not None:
        files.append(out / "attribution.png")
        plot.attribution_heatmap(attribution, tokens=result.tokens, what=attribution_of, path=files[-1])
    files.append(out / "trace.png")
    plot.trace_figure(result, answer_labels=answer_labels, corrupt_tokens=corrupt_tokens, path=files[-1])
    if atp is not None:
        files.append(out / "atp.png")
        plot.trace_figure(atp, answer_labels=answer_labels, corrupt_tokens=corrupt_tokens, path=files[-1])
        files.append(out / "atp_scatter.png")
        plot.atp_scatter(atp, result, path=files[-1])
    if html:
        from . import report

        files.append(report.write_html(
            out / "report.html", trace=result, atp=atp, trace_answers=answer_labels, attention=attention,
            attribution=attribution, attribution_of=attribution_of, tokens=result.tokens, title=title,
        ))  # fmt: skip
    return files


def _finite(d: dict) -> dict:
    """NaN (a constant side: no correlation) as null, for strict JSON."""
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in d.items()}
