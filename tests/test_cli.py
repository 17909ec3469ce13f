"""The command line on the bundled model: the demo's numbers say where the recall lives; bad input
ends in one line `error: ...` and exit status 2 before the model runs."""

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
from conftest import needs_toy
from transformers import LlamaConfig, LlamaForCausalLM

from gdn_intervene import cli, tracing
from gdn_intervene.toy import load_toy, mqar

# The bundled toy is a Qwen3.5 checkpoint (transformers 5.5 on); test_core checks the one-line
# refusal where it cannot load.
pytestmark = needs_toy


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main(["demo", "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "trace.json").read_text()), stdout.getvalue()


def test_demo_writes_pictures_numbers_and_report(demo):
    from PIL import Image

    out, data, _ = demo
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == {"trace.png", "attribution.png", "atp.png", "atp_scatter.png"}
    assert (out / "report.html").stat().st_size > 1_000_000  # plotly.js is embedded: works offline
    assert data["logit_diff"]["clean"] > 0 > data["logit_diff"]["corrupt"]
    for name in pngs:
        dpi = Image.open(out / name).info["dpi"]
        assert min(dpi) >= 150, (name, dpi)


def test_trace_json_records_the_corruption(demo):
    _, data, _ = demo
    c = data["corruption"]
    assert c["kind"] == "key" and c["positions"] == data["corrupted_positions"] == [data["key_position"]]
    assert c["tokens"] == [c["corrupt_prompt"].split()[data["key_position"]]]
    assert data["answer_tokens"] == {"clean": "v12", "corrupt": "v4"}


def test_demo_summary_names_only_restored_sites(demo):
    """No "best" cell for a site where nothing was restored (every score ~0)."""
    _, data, stdout = demo
    rows = {line.split()[0]: line for line in stdout.splitlines() if line.split() and line.split()[0] in data["sites"]}
    assert set(rows) == {"k", "state", "recurrence", "out_proj"}
    assert "no cell restored anything (score < 0.05) at: v, beta, decay" in stdout


def test_demo_finds_the_recall_in_the_first_gdn_state(demo):
    """The corrupted prompt replaces the queried key in the context (position kpos, its value at
    kpos + 1). Restoring layer 0's state after the pair is written restores the recall; before the
    key nothing does; layer 1's state never does. Layer 0's post-conv key a few tokens after the
    key restores it too: the conv carries the key to the position where the pair is written."""
    _, data, _ = demo
    kpos, vpos, T = data["key_position"], data["value_position"], len(data["tokens"])
    layers = data["layers"]
    state = {L: row for L, row in zip(layers, data["scores"]["state"])}
    first, second = layers
    assert max(abs(s) for s in state[first][:kpos]) < 0.05
    assert min(state[first][vpos + 1 : T - 1]) > 0.9
    assert max(abs(s) for s in state[second][: T - 1]) < 0.1
    k_first = dict(zip(layers, data["scores"]["k"]))[first]
    assert max(k_first[kpos : kpos + 4]) > 0.9 and max(abs(s) for s in k_first[:kpos]) < 0.05
    recurrence = dict(zip(layers, data["scores"]["recurrence"]))[first]
    assert recurrence[-1] > 0.9  # the query reads it out of the layer-0 state


def test_demo_attribution_peaks_where_the_queried_pair_is_written(demo):
    """Direct attribution of logit(clean answer) - logit(corrupt answer) at the query: layer 0's
    contributions peak at a source position whose conv window (s-3..s) holds the queried key and
    its value, and layer 0 carries most of the direct effect."""
    _, data, stdout = demo
    att = data["attribution"]
    kpos, vpos = data["key_position"], data["value_position"]
    assert att["of"] == "logit(v12) - logit(v4)" and att["position"] == len(data["tokens"]) - 1
    assert vpos <= att["peak"]["0"] <= kpos + 3
    assert att["direct_effect"][0] > 2 * abs(att["direct_effect"][1])
    assert "attribution of logit(v12) - logit(v4) at 18:k3: layer 0 direct effect" in stdout


# ---------------------------------------------------------------- errors: one line, exit 2


def run(argv, capsys):
    capsys.readouterr()  # drop what came before
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, [line for line in err if not line.startswith(("[transformers]", "Loading weights"))]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is loaded: these errors come before any work."""
    import gdn_intervene.toy

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(gdn_intervene.toy, "load_toy", boom)
    monkeypatch.setattr(cli, "_load", boom)


_BEFORE_WORK = {
    "empty sites": (["demo", "--sites", ","], "argument --sites: no site names in ','; sites are: q_pre_conv"),
    "unknown site": (["demo", "--sites", "bta"], "unknown site(s) 'bta'; sites are: q_pre_conv"),
    "bad position": (["trace", "--prompt", "k1", "--corrupt-positions", "1,x"], "'x' in '1,x' is not one"),
    "no cuda": (["trace", "--prompt", "k1", "--corrupt-positions", "1", "--device", "cuda"], "CUDA is not available"),
    "bad device": (["attention", "--device", "gpu0"], "'gpu0' is not a device"),
    "bad corruption": (["demo", "--corrupt", "pair"], "invalid choice: 'pair'"),
    "bad dtype": (["trace", "--prompt", "k1", "--corrupt-positions", "1", "--dtype", "fp8"], "invalid choice: 'fp8'"),
    "bad answers": (["attention", "--attribution", "--answers", "v1"], "expected two tokens A,B; got 'v1'"),
    "verify without atp": (
        ["trace", "--prompt", "k1", "--corrupt-positions", "1", "--verify", "3"],
        "--verify goes with --method atp",
    ),
    "bad verify": (
        ["trace", "--prompt", "k1", "--corrupt-positions", "1", "--method", "atp", "--verify", "-1"],
        "expected an integer >= 0",
    ),
    "bad method": (
        ["trace", "--prompt", "k1", "--corrupt-positions", "1", "--method", "fast"],
        "invalid choice: 'fast'",
    ),
}


@pytest.mark.parametrize("argv, message", _BEFORE_WORK.values(), ids=_BEFORE_WORK)
def test_error_before_any_work(argv, message, capsys, no_model, tmp_path):
    if argv[0] == "trace" and "--device" in argv:
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    rc, err = run(argv + ["--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_uncreatable_out_is_refused_before_the_sweep(tmp_path, capsys, no_model):
    (tmp_path / "file").write_text("x")
    rc, err = run(["demo", "--out", str(tmp_path / "file" / "sub"), "--no-progress"], capsys)
    assert rc == 2 and err == [
        f"error: --out {tmp_path / 'file' / 'sub'}: cannot create or write there (Not a directory)"
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only directory")
def test_unwritable_out_is_refused_before_the_sweep(tmp_path, capsys, no_model):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    rc, err = run(["demo", "--out", str(ro), "--no-progress"], capsys)
    assert rc == 2 and len(err) == 1 and "cannot create or write there" in err[0]


def test_model_that_is_neither_a_directory_nor_a_hub_id(tmp_path, capsys):
    rc, err = run(
        ["trace", "--model", "./no/such/dir", "--prompt", "a", "--corrupt-positions", "0", "--out", str(tmp_path)],
        capsys,
    )
    assert rc == 2 and err == ["error: --model './no/such/dir' is neither a directory nor a hub id (owner/name)"]


def test_errors_after_loading(tmp_path, capsys):
    out = ["--out", str(tmp_path / "o"), "--no-progress"]
    rc, err = run(["trace", "--prompt", "k1 v1 k2 v2 k1", "--corrupt", "k1 v1 k2 k1"] + out, capsys)
    assert rc == 2 and err == [
        "error: the prompt has 6 tokens and --corrupt has 5; causal tracing needs equal token "
        "lengths (or use --corrupt-positions)"
    ]
    rc, err = run(
        ["trace", "--prompt", "k1 v3 k2 v7 <sep> k2", "--corrupt-positions", "2", "--replacement", "k99"] + out, capsys
    )
    assert rc == 2 and len(err) == 1 and "--replacement 'k99' is not a token of this tokenizer" in err[0]
    rc, err = run(["trace", "--prompt", "k1 v3 k2 v7 <sep> k2", "--corrupt-positions", "9"] + out, capsys)
    assert rc == 2 and err == [
        "error: --corrupt-positions 9: the prompt has 7 tokens (positions 0..6, <bos> included "
        "where the tokenizer adds it)"
    ]
    # k1 v3 is not the queried pair: replacing k1 leaves the answer v7
    rc, err = run(
        ["trace", "--prompt", "k1 v3 k2 v7 <sep> k2", "--corrupt-positions", "1", "--replacement", "k5"] + out, capsys
    )
    assert rc == 2 and len(err) == 1
    assert (
        err[0].startswith("error: the clean and corrupted prompts have the same answer 'v7'")
        and "try another corruption" in err[0]
    )
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    rc, err = run(
        ["trace", "--model", str(tmp_path / "llama"), "--prompt", "a", "--corrupt-positions", "0"] + out, capsys
    )
    assert rc == 2 and len(err) == 1 and "LlamaForCausalLM has no Gated DeltaNet" in err[0]


@pytest.fixture
def no_forward(monkeypatch):
    """Load the model as usual but fail the test if it runs a forward (or a figure is drawn)."""
    real = cli._load

    def load(*a, **k):
        model, tok, name = real(*a, **k)

        def boom(*_):
            raise AssertionError("the model ran before the error")

        model.register_forward_pre_hook(boom)
        return model, tok, name

    monkeypatch.setattr(cli, "_load", load)


# Refused after tokenizing (the bundled toy's prompt has 19 tokens) but before any forward or file.
_BEFORE_FORWARD = {
    "position out of range": (
        ["attention", "--attribution", "--position", "99"],
        "error: --position 99: the prompt has 19 tokens; expected a position in 0..18",
    ),
    "negative position": (
        ["attention", "--attribution", "--position", "-1"],
        "error: --position -1: the prompt has 19 tokens; expected a position in 0..18",
    ),
    "position on a given prompt": (
        ["attention", "--prompt", "k1 v2 <sep> k1", "--attribution", "--position", "5"],
        "error: --position 5: the prompt has 5 tokens; expected a position in 0..4",
    ),
    "unknown answer": (
        ["attention", "--attribution", "--answers", "foo,bar"],
        "error: --answers 'foo' is not a token of this tokenizer (it maps to the unknown token); use a "
        "token from its vocabulary, e.g. 'k1'",
    ),
    "second answer unknown": (
        ["attention", "--attribution", "--answers", "v2,v99"],
        "error: --answers 'v99' is not a token of this tokenizer",
    ),
    "answers: a word, not a token": (
        ["attention", "--attribution", "--answers", "v2 v3,v4"],
        "error: --answers 'v2 v3' is not a token of this tokenizer",
    ),
}


@pytest.mark.parametrize("argv, message", _BEFORE_FORWARD.values(), ids=_BEFORE_FORWARD)
def test_error_after_tokenizing_before_any_forward(argv, message, capsys, no_forward, tmp_path):
    out = tmp_path / "o"
    rc, err = run(argv + ["--out", str(out)], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith(message), err
    assert list(out.iterdir()) == []  # no attention_layer<L>.png left behind


# Refused before the model is loaded: the arguments alone are wrong.
_BEFORE_LOADING = {
    "same answer twice": (
        ["attention", "--attribution", "--answers", "v2,v2"],
        "error: argument --answers: expected two different tokens A,B; got 'v2,v2', the token 'v2' "
        "twice (logit(A) - logit(B) would be 0 everywhere)",
    ),
    "empty trace prompt": (
        ["trace", "--prompt", "", "--corrupt-positions", "0"],
        "error: --prompt is empty; expected text with at least one token (got '')",
    ),
    "blank trace prompt": (
        ["trace", "--prompt", "  ", "--corrupt-positions", "0"],
        "error: --prompt is empty; expected text with at least one token (got '  ')",
    ),
    "empty corrupted prompt": (
        ["trace", "--prompt", "k1 v2", "--corrupt", ""],
        "error: --corrupt is empty; expected text with at least one token (got '')",
    ),
    "empty attention prompt": (
        ["attention", "--prompt", ""],
        "error: --prompt is empty; expected text with at least one token (got '')",
    ),
    "position without attribution": (["attention", "--position", "3"], "error: --position goes with --attribution"),
    "answers without attribution": (
        ["attention", "--answers", "v1,v2", "--position", "3"],
        "error: --position and --answers go with --attribution",
    ),
}


@pytest.mark.parametrize("argv, message", _BEFORE_LOADING.values(), ids=_BEFORE_LOADING)
def test_error_before_loading(argv, message, capsys, no_model, tmp_path):
    out = tmp_path / "o"
    rc, err = run(argv + ["--out", str(out)], capsys)
    assert rc == 2 and err == [message + (" (see gdn-intervene attention --help)" if "argument" in message else "")]
    assert not out.exists() or list(out.iterdir()) == []


def test_same_answer_by_id_and_text_without_tokens(tmp_path, capsys, no_forward, monkeypatch):
    """Two spellings of one token id, and text from which the tokenizer keeps no token (only the
    <bos> it adds), are refused after tokenizing. The bundled tokenizer has neither case, so a
    wrapper around it makes `V2` an alias of `v2` and drops the character `~`."""

    class Tok:
        def __init__(self, tok):
            self.tok = tok

        def __getattr__(self, name):
            return getattr(self.tok, name)

        def __call__(self, text, **kw):
            return self.tok(text.replace("~", ""), **kw)

        def convert_tokens_to_ids(self, t):
            return self.tok.convert_tokens_to_ids("v2" if t == "V2" else t)

    real = cli._load
    monkeypatch.setattr(cli, "_load", lambda *a, **k: (lambda m, t, n: (m, Tok(t), n))(*real(*a, **k)))
    out = tmp_path / "o"
    rc, err = run(["attention", "--attribution", "--answers", "v2,V2", "--out", str(out)], capsys)
    assert rc == 2 and err == [
        "error: --answers v2,V2: both are the token 'v2'; expected two different tokens A,B "
        "(logit(A) - logit(B) would be 0 everywhere)"
    ]
    rc, err = run(["trace", "--prompt", "~", "--corrupt-positions", "0", "--out", str(out)], capsys)
    assert rc == 2 and err == [
        "error: --prompt '~' gives no token (only the tokenizer's own special tokens); expected "
        "text with at least one token"
    ]
    rc, err = run(["attention", "--prompt", "~~", "--out", str(out)], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --prompt '~~' gives no token")
    assert list(out.iterdir()) == []


def test_dtype_is_honoured_for_the_bundled_model(tmp_path, monkeypatch):
    import torch

    import gdn_intervene.toy

    seen = []
    real = gdn_intervene.toy.load_toy
    monkeypatch.setattr(gdn_intervene.toy, "load_toy", lambda **kw: seen.append(kw) or real(**kw))
    assert cli.main(["attention", "--dtype", "bfloat16", "--layers", "0", "--heads", "0", "--out", str(tmp_path)]) == 0
    assert seen == [{"dtype": torch.bfloat16}]


# ---------------------------------------------------------------- help


def test_every_option_has_help_and_sites_list_the_registry():
    from gdn_intervene.sites import SITE_NAMES

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, (name, action.dest)
        text = p.format_help()
        if name in ("demo", "trace"):  # the commands that take sites
            assert ", ".join(SITE_NAMES).replace(" ", "") in text.replace(" ", "").replace("\n", "")
            assert ",".join(tracing.TRACE_SITES) in text
    assert cli.TRACE_SITES == tracing.TRACE_SITES


def _imports_after(code: str, setup: str = "") -> set:
    script = (
        f"import sys\n{setup}\nbefore = set(sys.modules)\n{code}\nprint(' '.join(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_parsing_imports_nothing_heavy():
    """The CLI module itself imports torch, transformers, matplotlib and plotly only inside the
    commands (beyond what `import gdn_intervene` already does)."""
    new = _imports_after(
        "from gdn_intervene import cli\ncli.build_parser().parse_args(['demo'])", "import gdn_intervene"
    )
    heavy = {m.split(".")[0] for m in new} & {"torch", "transformers", "matplotlib", "plotly", "numpy"}
    assert not heavy


def test_help_does_not_import_torch():
    code = "import runpy, sys; sys.argv = ['gdn-intervene', '--help']\ntry:\n    runpy.run_module('gdn_intervene', run_name='__main__')\nexcept SystemExit:\n    pass"
    new = _imports_after(code)
    assert "torch" not in new and "transformers" not in new


# ---------------------------------------------------------------- trace and attention


def test_trace_and_attention_commands(tmp_path):
    _, tok = load_toy()
    clean, bad, info = mqar.demo_prompts(seed=1, kind="key")
    text = " ".join(tok.convert_ids_to_tokens(clean[0, 1:].tolist()))
    absent = tok.convert_ids_to_tokens(int(bad[0, info["key_position"]]))
    assert (
        cli.main(
            [
                "trace",
                "--prompt",
                text,
                "--corrupt-positions",
                str(info["key_position"]),
                "--replacement",
                absent,
                "--sites",
                "state,k",
                "--out",
                str(tmp_path / "t"),
                "--no-progress",
            ]
        )
        == 0
    )
    data = json.loads((tmp_path / "t" / "trace.json").read_text())
    assert data["sites"] == ["state", "k"] and data["tokens"] == tok.convert_ids_to_tokens(clean[0].tolist())
    assert data["corruption"] == {
        "kind": "positions",
        "replacement": absent,
        "positions": [info["key_position"]],
        "tokens": [absent],
    }
    assert max(data["scores"]["state"][0][info["value_position"] + 1 : -1]) > 0.9  # same finding, via `trace`
    assert not (tmp_path / "t" / "report.html").exists()  # trace writes the report only with --html
    assert (
        cli.main(
            [
                "attention",
                "--layers",
                "0",
                "--heads",
                "1",
                "--out",
                str(tmp_path / "a"),
                "--html",
                "--attribution",
                "--answers",
                "v12,v4",
            ]
        )
        == 0
    )
    assert {p.name for p in (tmp_path / "a").iterdir()} == {"attention_layer0.png", "attribution.png", "report.html"}
    html = (tmp_path / "a" / "report.html").read_text()
    assert 'id="attention"' in html and 'id="attribution"' in html


def test_trace_method_atp_verifies_its_top_cells(capsys, tmp_path):
    """`trace --method atp --verify 3`: trace.json holds the estimates and, for the top 3 cells by
    |estimate|, the activation-patching scores, which equal causal_trace's for those cells."""
    import json

    import gdn_intervene as gi
    from gdn_intervene import tracing
    from gdn_intervene.toy import load_toy

    clean, corrupt = "k12 v11 k2 v2 k3 v12 k13 v3 <sep> k3", "k12 v11 k2 v2 k9 v12 k13 v3 <sep> k3"
    rc, err = run(
        [
            "trace",
            "--prompt",
            clean,
            "--corrupt",
            corrupt,
            "--method",
            "atp",
            "--verify",
            "3",
            "--no-progress",
            "--out",
            str(tmp_path),
        ],
        capsys,
    )
    assert rc == 0, err
    data = json.loads((tmp_path / "trace.json").read_text())
    assert data["method"] == "attribution patching" and len(data["verified"]) == 3
    model, tok = load_toy()
    gi.patch(model)
    ids = [tok(x, return_tensors="pt").input_ids for x in (clean, corrupt)]
    full = tracing.causal_trace(model, *ids)
    for v in data["verified"]:
        assert abs(v["activation_patching"] - full.score(tracing.Cell(v["site"], v["layer"], v["position"]))) <= 1e-5
        assert (
            v["estimate"] == data["scores"][v["site"]][data["layers"].index(v["layer"])][v["position"]]
            or abs(v["estimate"] - data["scores"][v["site"]][data["layers"].index(v["layer"])][v["position"]]) <= 1e-6
        )


def test_demo_compares_attribution_patching_with_the_trace(demo):
    """The demo's line on attribution patching states `tracing.agreement` of the two results."""
    _, _, stdout = demo
    line = next(x for x in stdout.splitlines() if x.startswith("attribution patching of the same"))
    assert "against the trace" in line and "atp_scatter.png" in line
