"""The fla lane's ground: HF's forward really reaches fla's Triton kernels on this CPU, the numbers
are right, and `gdn-intervene doctor` says so.

- Every family: a prefill and a decode step of the UNPATCHED model call fla's chunk and
  recurrent entry points (`fla_lane.FLA_ENTRIES`, counted), once per GDN / KDA layer.
- fla's results under the interpreter equal HF's own torch kernels on the same arguments to
  fp32 kernel noise (the chunk kernel's o and final state, 1e-5 relative: fla and HF's torch
  code sum in other orders; ~1e-7 seen), so the shims (one autotuner config, loop indices) do
  not change the math.
- `doctor.report(model)` names fla for the delta-rule kernels of every layer (causal-conv1d is
  not installed here: the conv kernels read "torch").
"""

from kernels_fla import fla_lane

fla_lane.require()

import pytest  # noqa: E402
import torch  # noqa: E402
from models import KDA, MODELS  # noqa: E402
from reference import KERNELS  # noqa: E402

import gdn_intervene as gi  # noqa: E402
from gdn_intervene import doctor  # noqa: E402

ids_for, logits, new_cache, view = fla_lane.helpers()
NAMES = list(MODELS)


def _entries(name):
    kind = "kda" if name in KDA else "gated_delta_rule"
    return f"chunk_{kind}_fwd", f"fused_recurrent_{kind}_fwd"


@pytest.mark.parametrize("name", NAMES)
def test_hf_forward_reaches_fla_kernels(name):
    _, ref = fla_lane.pair(name)
    layers = len(gi.gdn_layers(fla_lane.pair(name)[0]))
    chunk, recurrent = _entries(name)
    cache = new_cache(ref)
    with fla_lane.fla_calls() as prefill:
        out = logits(ref, ids_for(5, B=1), cache=cache, use_cache=True)
    with fla_lane.fla_calls() as decode:
        logits(ref, out[:, -1:].argmax(-1), cache=cache, use_cache=True)
    assert prefill == {chunk: layers}, prefill
    assert decode == {recurrent: layers}, decode


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("name", ["qwen3_5", "kimi_linear"])
def test_fla_results_equal_hf_torch_kernels(name):
    """One layer's chunk call (T = 66: two chunks, the second of 2 tokens) with a cache, then a
    decode step: fla's o and state against HF's torch function on the very same arguments."""
    if name not in MODELS:
        pytest.skip(f"{name} is not in this transformers release")
    _, ref = fla_lane.pair(name)
    layer = max(gi.gdn_layers(fla_lane.pair(name)[0]))
    seen = []

    def around(kernel, q, k, v, **kw):
        out = kernel(q, k, v, **kw)
        want = fla_lane.torch_kernel(kernel)(q, k, v, **kw)
        seen.append((out, want))
        return out

    cache = new_cache(ref)
    with fla_lane.kernel_around(ref, layer, around), fla_lane.fla_calls() as calls:
        out = logits(ref, ids_for(66, B=1), cache=cache, use_cache=True)
        logits(ref, out[:, -1:].argmax(-1), cache=cache, use_cache=True)
    assert len(seen) == 2 and sum(calls.values()) == 4  # both layers, prefill and decode
    for (o, S), (o_t, S_t) in seen:
        assert o.shape == o_t.shape and S.shape == S_t.shape
        assert _rel(o, o_t) < 1e-5 and _rel(S, S_t) < 1e-5, (_rel(o, o_t), _rel(S, S_t))
        assert not torch.equal(o, o_t)  # two implementations, really: not the same bits


@pytest.mark.parametrize("name", ["qwen3_5", "kimi_linear"])
def test_doctor_shows_the_fla_route(name):
    if name not in MODELS:
        pytest.skip(f"{name} is not in this transformers release")
    patched, _ = fla_lane.pair(name)
    text = doctor.report(patched)
    routes = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in KERNELS + (
            "causal_conv1d_fn",
            "causal_conv1d_update",
            "causal_conv1d_forward",
        ):
            routes.setdefault(parts[0], set()).add(parts[1])
    delta = {k: v for k, v in routes.items() if k in KERNELS}
    assert len(delta) == 2 and all(v == {"fla"} for v in delta.values()), text
    assert routes["causal_conv1d_fn"] == {"torch"}, text
    assert "passed" in text.split("first-call self-check")[1], text


def test_doctor_names_the_installed_fla():
    """fla-core alone (what HF's route needs) is installed here: doctor's versions block should
    give its version, not "not installed" (docs/kernels-fla.md, "Known gaps")."""
    lines = [line for line in doctor.versions() if "fla" in line]
    assert lines and all("not installed" not in line for line in lines), lines
