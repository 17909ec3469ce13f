"""Recipes for the README, run as written, and the claims they rest on, checked against
independent references.

- `FROM_CONFIG`: tiny Qwen3.5 and Kimi Linear models built in code from HF's config classes,
  patched, one forward with a capture, `generate` (docs/guides/releases.md).
- `PYVENE_STATE`: restoring layer 0's recurrent state after a position with pyvene's state
  component inside `gi.state_at` (docs/guides/pyvene.md); checked against the same patch made with
  `gi.intervene` + `gi.state_at`, position by position.
- `analysis.token_contributions` on the KDA families (per-channel decay) against a float64
  per-channel recurrence written here from HF's own kernel arguments.
- the pyvene example names the answer and the replaced tokens by their text.

Each recipe string is a documentation block verbatim (found by a line of it, on exactly one page
of the README and docs/).
"""

import contextlib
import importlib.util
import io
import sys
from pathlib import Path

import pytest
import torch
from conftest import ids_for, needs_toy, no_hooks
from models import KDA
from reference import kernel_edit

import gdn_intervene as gi
from gdn_intervene import analysis as an

ROOT = Path(__file__).resolve().parents[1]

FROM_CONFIG = """\
import torch
import transformers as tr
import gdn_intervene as gi

torch.manual_seed(0)
special = dict(vocab_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2)
layout = dict(num_hidden_layers=3, layer_types=["linear_attention", "full_attention", "linear_attention"])
tiny_models = [tr.Qwen3_5ForCausalLM(tr.Qwen3_5TextConfig(
    **special, **layout, hidden_size=32, intermediate_size=48,  # >= 1 full-attention layer: the cache, generate
    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12,
))]
if hasattr(tr, "KimiLinearConfig"):  # transformers 5.20 on
    tiny_models.append(tr.KimiLinearForCausalLM(tr.KimiLinearConfig(
        **special, **layout, hidden_size=32, intermediate_size=48,
        mlp_layer_types=["dense", "sparse", "dense"], num_local_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, n_group=1, topk_group=1,
        num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16,  # MLA full attention
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        linear_num_heads=2, linear_head_dim=8,                           # KDA: HK = HV, K = V
    )))
x = torch.randint(3, 96, (1, 12))
for tiny in tiny_models:
    gi.patch(tiny.eval())
    with torch.no_grad(), gi.capture(tiny, sites=["decay"], layers=[0]) as seen:
        out = tiny(x)
    generated = tiny.generate(x, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    print(f"{type(tiny).__name__}: GDN layers {list(gi.gdn_layers(tiny))}, logits {tuple(out.logits.shape)}, "
          f"layer 0 decay {tuple(seen[0, 'decay'][0].shape)}, generated {tuple(generated.shape)}")
"""
FROM_CONFIG_OUTPUT = {
    "qwen": "Qwen3_5ForCausalLM: GDN layers [0, 2], logits (1, 12, 96), layer 0 decay (1, 12, 4), generated (1, 15)",
    "kimi": "KimiLinearForCausalLM: GDN layers [0, 2], logits (1, 12, 96), layer 0 decay (1, 12, 2, 8), "
    "generated (1, 15)",
}

PYVENE_STATE = """\
import torch
import pyvene as pv
import gdn_intervene as gi
import gdn_intervene.pyvene as gp
from gdn_intervene.toy import load_toy, mqar

model, tokenizer = load_toy()
gi.patch(model)
gp.register()
clean, corrupt, info = mqar.demo_prompts(0, "key")   # the demo's prompts: k3 at position 5 -> an absent key
tokens = tokenizer.convert_ids_to_tokens(clean[0])
good, bad = tokenizer.convert_tokens_to_ids(["v12", "v4"])   # the clean and the corrupted run's answers

def logit_diff(logits):
    return float(logits[0, -1, good] - logits[0, -1, bad])

with torch.no_grad():
    d_clean, d_corrupt = logit_diff(model(clean).logits), logit_diff(model(corrupt).logits)
iv = pv.IntervenableModel([{"layer": 0, "component": "linear_attn_state", "unit": "pos"}], model)
for p in (5, 7, 17):
    # split layer 0's prefill after token p: its state site fires there (and at the end), and
    # pyvene's state component sees the state after p; the rest of the prompt reads the patched one
    with torch.no_grad(), gi.state_at(model, [p], layers=[0]):
        _, out = iv({"input_ids": corrupt}, [{"input_ids": clean}], {"sources->base": 0})
    restored = (logit_diff(out.logits) - d_corrupt) / (d_clean - d_corrupt)
    print(f"layer 0 state after {p}:{tokens[p]} restores {restored:.2f} of logit(v12) - logit(v4)")
"""
PYVENE_STATE_OUTPUT = """\
layer 0 state after 5:k3 restores 0.00 of logit(v12) - logit(v4)
layer 0 state after 7:k13 restores 0.99 of logit(v12) - logit(v4)
layer 0 state after 17:<sep> restores 1.00 of logit(v12) - logit(v4)
"""


def run_recipe(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<recipe>", "exec"), {"__name__": "__recipe__"})
    return out.getvalue()


@pytest.mark.parametrize(
    "code, marker",
    [
        (FROM_CONFIG, "tiny_models = [tr.Qwen3_5ForCausalLM("),
        (PYVENE_STATE, 'component": "linear_attn_state", "unit": "pos"}], model)'),
    ],
    ids=["from_config", "pyvene_state"],
)
def test_readme_has_the_recipe_verbatim(code, marker):
    from test_docs import page_blocks

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    found = [b.code for p in pages for b in page_blocks(p) if marker in b.code]
    assert found == [code], "the recipe is on exactly one page, verbatim"


# ---------------------------------------------------------------- from a config


def test_from_config_recipe():
    import transformers as tr

    if getattr(tr, "Qwen3_5TextConfig", None) is None:
        pytest.skip(f"transformers {tr.__version__} has no Qwen3.5")
    want = [FROM_CONFIG_OUTPUT["qwen"]] + ([FROM_CONFIG_OUTPUT["kimi"]] if hasattr(tr, "KimiLinearConfig") else [])
    assert run_recipe(FROM_CONFIG).splitlines() == want


# ---------------------------------------------------------------- pyvene: the state at a position


@needs_toy
def test_pyvene_state_recipe_prints_the_restored_fractions():
    pytest.importorskip("pyvene")
    assert run_recipe(PYVENE_STATE) == PYVENE_STATE_OUTPUT


@pytest.fixture(scope="module")
def toy():
    from gdn_intervene.toy import load_toy, mqar

    model, tok = load_toy()
    gi.patch(model)
    clean, corrupt, info = mqar.demo_prompts(0, "key")
    good, bad = tok.convert_tokens_to_ids(["v12", "v4"])
    return model, clean, corrupt, info, (good, bad)


@needs_toy
def test_pyvene_state_at_position_equals_intervene(toy):
    """pyvene's `linear_attn_state` inside `gi.state_at(model, [p])` restores layer 0's state after
    token p: the same logits (to 1e-6) as replacing the first `state` firing of the split
    corrupted run with the first firing of the split clean run through `gi.intervene`. The
    restored fraction follows the demo's finding: nothing before the pair is written, everything
    from the token after the pair (the conv carries the key two tokens on) to <sep>."""
    pv = pytest.importorskip("pyvene")
    import gdn_intervene.pyvene as gp

    gp.register()
    model, clean, corrupt, info, (good, bad) = toy
    T, kpos, vpos = clean.shape[1], info["key_position"], info["value_position"]
    # pyvene freezes the parameters (HF's logits then differ in the last bit): build it before the
    # reference runs, so that all runs share the freezing
    iv = pv.IntervenableModel([{"layer": 0, "component": "linear_attn_state", "unit": "pos"}], model)

    def diff(logits):
        return float(logits[0, -1, good] - logits[0, -1, bad])

    with torch.no_grad():
        d_clean, d_corrupt = diff(model(clean).logits), diff(model(corrupt).logits)
    restored = []
    try:
        for p in range(T - 1):
            with torch.no_grad(), gi.state_at(model, [p], layers=[0]):
                _, got = iv({"input_ids": corrupt}, [{"input_ids": clean}], {"sources->base": 0})
                assert no_hooks(model)
                with gi.capture(model, sites=["state"], layers=[0]) as seen:
                    model(clean)
                states = seen[0, "state"]
                assert len(states) == (2 if p < T - 1 else 1)  # after p, then the final state
                fired = []

                def swap(S):
                    fired.append(1)
                    return states[0] if len(fired) == 1 else None

                with gi.intervene(model, {(0, "state"): swap}):
                    want = model(corrupt).logits
                assert len(fired) == 2
            assert (got.logits - want).abs().max() <= 1e-6, p
            restored.append((diff(got.logits) - d_corrupt) / (d_clean - d_corrupt))
    finally:
        for param in model.parameters():
            param.requires_grad_(True)
    assert max(abs(r) for r in restored[:kpos]) < 0.05
    assert restored[vpos + 1] > 0.5  # the recipe's number: the state just after the pair
    assert min(restored[vpos + 1 :]) > 0.9


@needs_toy
def test_pyvene_state_at_two_positions_is_refused(toy):
    pv = pytest.importorskip("pyvene")
    import gdn_intervene.pyvene as gp

    gp.register()
    model, clean, corrupt, _, _ = toy
    iv = pv.IntervenableModel([{"layer": 0, "component": "linear_attn_state", "unit": "pos"}], model)
    try:
        with (
            torch.no_grad(),
            gi.state_at(model, [3, 7], layers=[0]),
            pytest.raises(
                ValueError,
                match=r"linear_attn_state' at layer 0: the layer is split after positions \[3, 7\].*give "
                r"state_at one position",
            ),
        ):
            iv({"input_ids": corrupt}, [{"input_ids": clean}], {"sources->base": 0})
        assert no_hooks(model)
    finally:
        for param in model.parameters():
            param.requires_grad_(True)


# ---------------------------------------------------------------- token_contributions with per-channel decay


def per_channel_contributions(call: dict, position: int):
    """From HF's KDA kernel arguments, in float64, token by token: the state S_p and the
    Frobenius norm of each token's term in it, ||(exp(G_p - G_j) ⊙ k_j) u_j^T||, the rank-one
    term formed in full. The kernel L2-normalises k (x / sqrt(sum x^2 + 1e-6)) and runs
    S_t = diag(exp(g_t)) S_{t-1} + k_t u_t^T, u_t = beta_t (v_t - (diag(exp(g_t)) S_{t-1})^T k_t),
    g_t [HV, K] one log decay per key channel. -> ([B, p+1, HV] norms, S_p, per-head-weight norms)."""
    k, v, g, beta = (call[n].double() for n in ("k", "v", "g", "beta"))
    assert g.shape == k.shape  # [B, T, HV, K]: per channel
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    B, _, H, K = k.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64)
    u = []
    for t in range(position + 1):
        S = S * g[:, t].exp()[..., None]
        u.append(beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t])))
        S = S + k[:, t, :, :, None] * u[-1][:, :, None, :]
    norms, one_weight, total = [], [], torch.zeros_like(S)
    for j in range(position + 1):
        w = g[:, j + 1 : position + 1].sum(1).exp()  # [B, HV, K]: decay from j to p, per channel
        term = (w * k[:, j])[..., None] * u[j][:, :, None, :]  # [B, HV, K, V]
        total += term
        norms.append(term.flatten(-2).norm(dim=-1))
        # what "one weight per head" would give: the channels' mean decay for every channel
        flat = (w.mean(-1, keepdim=True) * k[:, j])[..., None] * u[j][:, :, None, :]
        one_weight.append(flat.flatten(-2).norm(dim=-1))
    assert ((total - S).norm() / S.norm()).item() < 1e-10  # the terms sum to the recurrence's state
    return torch.stack(norms, 1), S, torch.stack(one_weight, 1)


@pytest.mark.parametrize("name", KDA or ["kimi_linear"])
def test_token_contributions_take_the_per_channel_decay(pair, name):
    """`analysis.token_contributions` on a KDA model equals the per-token terms' norms of an
    independent float64 per-channel recurrence (1e-5 relative), which one weight per head
    (the channels' mean decay) misses by far more."""
    if name not in KDA:
        pytest.skip("this transformers release has no KDA family")
    patched, ref = pair(name)
    ids = ids_for(40, B=2, seed=3)
    for layer in gi.gdn_layers(patched):
        call = {}
        with (
            kernel_edit(ref, layer, before=call.update, after=lambda out: call.update(S=out[1]) or out),
            torch.no_grad(),
        ):
            ref(input_ids=ids)
        for p in (17, 39):
            want, S, one_weight = per_channel_contributions(call, p)
            if p == 39:
                assert ((S - call["S"].double()).norm() / S.norm()).item() < 1e-5  # the reference is HF's state
            got = an.token_contributions(an.state_decomposition_for(patched, ids, layer, position=p))
            assert got.shape == want.shape  # [B, p + 1, HV]
            err = ((got.double() - want).norm() / want.norm()).item()
            assert err < 1e-5, (layer, p, err)
            assert ((one_weight - want).norm() / want.norm()).item() > 0.01  # measured 0.08-0.4


# ---------------------------------------------------------------- the pyvene example's labels


@needs_toy
def test_pyvene_example_names_tokens_by_their_text(tmp_path, monkeypatch, capsys):
    """The title and the printout name the clean answer and the replacement by decoded token
    text; the state sweep (inside state_at) finds the demo's result."""
    pytest.importorskip("pyvene")
    spec = importlib.util.spec_from_file_location("pyvene_example", ROOT / "examples" / "pyvene_activation_patching.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    titles, grids = [], []
    real = example.plot
    monkeypatch.setattr(example, "plot", lambda grid, *a: (grids.append(grid), titles.append(a[-2]), real(grid, *a)))
    out = tmp_path / "state.png"
    monkeypatch.setattr(sys, "argv", ["x", "--component", "linear_attn_state", "--out", str(out)])
    example.main()
    printed = capsys.readouterr().out
    assert "clean answer 'v12' (token 32); corrupted: 'k3' -> 'k0' at 5;" in printed
    assert "answer token 32" not in printed
    assert titles == [
        "pyvene: linear_attn_state after each position (state_at) restored, clean -> corrupted "
        "('k3' -> 'k0' at 5)\nrecovery of logit('v12'), the clean answer"
    ]
    (grid,) = grids
    assert grid.shape == (2, 18)  # GDN layers 0 and 1 x positions 0..T-2
    assert grid[0, 7:].min() > 0.9 and grid[0, :5].abs().max() < 0.05 and grid[1].abs().max() < 0.1
    assert out.exists()
