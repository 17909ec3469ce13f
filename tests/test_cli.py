"""The command line on the bundled model: the demo's numbers say where the recall lives."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gdn_intervene import cli
from gdn_intervene.toy import load_toy


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert cli.main(["demo", "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "trace.json").read_text())


def test_demo_writes_pictures_and_numbers(demo):
    out, data = demo
    assert {p.name for p in out.glob("*.png")} == {"trace.png"} | {f"trace_{s}.png" for s in data["sites"]}
    assert data["logit_diff"]["clean"] > 0 > data["logit_diff"]["corrupt"]


def test_demo_finds_the_recall_in_the_first_gdn_state(demo):
    """The corrupted prompt replaces the queried key in the context (position kpos, its value at
    kpos + 1). Restoring layer 0's state after the pair is written restores the recall; before the
    key nothing does; layer 1's state never does. Layer 0's post-conv key a few tokens after the
    key restores it too: the conv carries the key to the position where the pair is written."""
    _, data = demo
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


def test_cli_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit, match="unknown site.*'bta'.*sites are: q_pre_conv"):
        cli.main(["demo", "--sites", "bta", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="6 tokens and --corrupt has 5.*equal token lengths"):
        cli.main(["trace", "--prompt", "k1 v1 k2 v2 k1", "--corrupt", "k1 v1 k2 k1", "--out", str(tmp_path), "--no-progress"])
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="LlamaForCausalLM has no Gated DeltaNet"):
        cli.main(["trace", "--model", str(tmp_path / "llama"), "--prompt", "a", "--corrupt-positions", "0"])


def test_trace_and_attention_commands(tmp_path):
    model, tok = load_toy()
    clean, bad, info = cli.demo_prompts(seed=1, corrupt="key")
    text = tok.decode(clean[0], skip_special_tokens=False).replace("<bos>", "").strip()
    absent = tok.convert_ids_to_tokens(int(bad[0, info["key_position"]]))
    cli.main(["trace", "--prompt", text, "--corrupt-positions", str(info["key_position"]), "--replacement", absent,
              "--sites", "state,k", "--out", str(tmp_path / "t"), "--no-progress"])
    data = json.loads((tmp_path / "t" / "trace.json").read_text())
    assert data["sites"] == ["state", "k"] and data["tokens"] == tok.convert_ids_to_tokens(clean[0].tolist())
    assert max(data["scores"]["state"][0][info["value_position"] + 1 : -1]) > 0.9  # same finding, via `trace`
    cli.main(["attention", "--layers", "0", "--heads", "1", "--out", str(tmp_path / "a")])
    assert (tmp_path / "a" / "attention_layer0_head1.png").exists()
