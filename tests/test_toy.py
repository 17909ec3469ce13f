"""The bundled MQAR toy model: task, tokenizer, checkpoint, prompts, training loop."""

import json

import pytest
import torch
from conftest import needs_toy, run

from gdn_intervene.toy import TOY_PATH, load_toy, mqar

pytestmark = needs_toy

TEST_SEED = 20_240  # disjoint from the training (0) and held-out (10_000) seeds


@pytest.fixture(scope="module")
def toy():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: load_toy passes local_files_only
        yield load_toy()


def test_bundle_files():
    names = {p.name for p in TOY_PATH.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "training.json"} <= names
    assert (TOY_PATH / "model.safetensors").stat().st_size <= 2_000_000
    info = json.loads((TOY_PATH / "training.json").read_text())
    assert info["held_out_recall"] >= 0.99 and info["ablation"]["none"] == info["held_out_recall"]


def test_recall_lives_in_first_gdn_layer(toy):
    """The finding the demo builds on: layer 0's GDN output at the queries carries the answer."""
    from gdn_intervene.toy.train import ablation

    model, _ = toy
    acc = ablation(model, mqar.make_batch(64, generator=torch.Generator().manual_seed(TEST_SEED)))
    assert acc["layers.0.linear_attn[queries]"] < 0.2  # ~chance (1/16)
    assert acc["layers.0.linear_attn[context]"] >= 0.95  # its outputs there are not needed
    others = {k: v for k, v in acc.items() if not k.startswith("layers.0.linear_attn")}
    assert min(others.values()) >= 0.95, others  # attention and the other blocks are not needed


def test_make_batch_shapes_and_targets():
    n, pairs = 5, 6
    b = mqar.make_batch(n, num_pairs=pairs, generator=torch.Generator().manual_seed(0))
    L = mqar.seq_len(pairs)
    assert b.input_ids.shape == b.targets.shape == (n, L) and len(b) == n
    assert (b.input_ids[:, 0] == mqar.BOS_ID).all() and (b.input_ids[:, 2 * pairs + 1] == mqar.SEP_ID).all()
    qpos = mqar.query_positions(pairs)
    assert b.mask.sum(1).tolist() == [pairs] * n
    assert b.mask[:, qpos].all()
    # each target is the next token, and is the value paired with that key in the context
    assert torch.equal(b.targets[:, qpos], b.input_ids[:, qpos + 1])
    for row in b.input_ids.tolist():
        ctx = dict(zip(row[1 : 2 * pairs + 1 : 2], row[2 : 2 * pairs + 1 : 2]))
        assert len(ctx) == pairs and len(set(ctx.values())) == pairs  # distinct keys and values
        queries = row[2 * pairs + 2 :: 2]
        assert sorted(queries) == sorted(ctx)  # every key queried once
        assert all(row[p + 1] == ctx[row[p]] for p in qpos.tolist())
    # deterministic given the generator
    again = mqar.make_batch(n, num_pairs=pairs, generator=torch.Generator().manual_seed(0))
    assert torch.equal(b.input_ids, again.input_ids)


def test_tokenizer_round_trip():
    tok, hf = mqar.build_tokenizer()
    b = mqar.make_batch(3, generator=torch.Generator().manual_seed(1))
    for row in b.input_ids.tolist():
        text = hf.decode(row, skip_special_tokens=True)  # drops <bos>, keeps <sep>
        assert hf(text).input_ids == row
        assert tok.encode(text).ids == row
    assert len(hf) == mqar.VOCAB_SIZE


def test_saved_tokenizer_matches_code(toy):
    _, tokenizer = toy
    _, hf = mqar.build_tokenizer()
    assert tokenizer.get_vocab() == hf.get_vocab() == mqar.VOCAB
    text = "k3 v7 k1 v2 <sep> k1"
    assert tokenizer(text).input_ids == [
        mqar.BOS_ID,
        mqar.key_id(3),
        mqar.value_id(7),
        mqar.key_id(1),
        mqar.value_id(2),
        mqar.SEP_ID,
        mqar.key_id(1),
    ]


def test_checkpoint_recall(toy):
    model, _ = toy
    assert not model.training
    batch = mqar.make_batch(64, generator=torch.Generator().manual_seed(TEST_SEED))
    assert mqar.recall(model, batch) >= 0.95


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prompt_and_corrupt(toy, seed):
    model, tokenizer = toy
    g = torch.Generator().manual_seed(TEST_SEED + seed)
    pairs = mqar.sample_pairs(8, generator=g)
    query = pairs[seed][0]
    clean = mqar.prompt(pairs, query)
    bad = mqar.corrupt(pairs, query, generator=g)
    assert clean.input_ids.shape == bad.input_ids.shape == (1, 2 * 8 + 3)
    assert bad.query_key != query and bad.answer != clean.answer
    assert torch.equal(clean.input_ids[:, :-1], bad.input_ids[:, :-1])  # only the query differs
    assert tokenizer(clean.text).input_ids == clean.input_ids[0].tolist()
    with torch.no_grad():
        for p in (clean, bad):
            assert model(input_ids=p.input_ids).logits[0, -1].argmax().item() == p.answer


def test_corrupt_rejects_bad_keys():
    pairs = [(0, 3), (1, 4)]
    assert mqar.corrupt(pairs, 0).answer == mqar.value_id(4)  # the only other key
    with pytest.raises(ValueError):
        mqar.corrupt(pairs, 0, other_key=0)
    with pytest.raises(ValueError):
        mqar.prompt(pairs, 5)
    with pytest.raises(ValueError):
        mqar.prompt([(0, 3), (1, 3)], 0)  # repeated value: answers would coincide


def test_generate_and_cached_decode(toy):
    model, _ = toy
    pairs = mqar.sample_pairs(8, generator=torch.Generator().manual_seed(TEST_SEED))
    (k0, v0), (k1, v1) = pairs[3], pairs[5]
    p = mqar.prompt(pairs, k0)
    out = model.generate(p.input_ids, max_new_tokens=1, do_sample=False, use_cache=True)
    assert out.shape == (1, p.input_ids.shape[1] + 1) and out[0, -1].item() == p.answer
    # decode token by token from the cache (GDN recurrent step + attention KV cache):
    # after "<sep> k0 v0 k1" the next token is the value of k1, as in the full forward
    with torch.no_grad():
        out = model(input_ids=p.input_ids, use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values  # before 5.24
        for tok in (mqar.value_id(v0), mqar.key_id(k1)):
            step = run(model, input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True)
            cache = step.cache if hasattr(step, "cache") else step.past_key_values
        ids = torch.cat([p.input_ids, torch.tensor([[mqar.value_id(v0), mqar.key_id(k1)]])], 1)
        full = model(input_ids=ids).logits[0, -1]
    assert step.logits[0, -1].argmax().item() == full.argmax().item() == mqar.value_id(v1)
    torch.testing.assert_close(step.logits[0, -1], full, atol=1e-4, rtol=1e-4)


def test_train_smoke(tmp_path):
    from gdn_intervene.toy import train

    lines = []
    model, info = train.train(seed=0, max_steps=2, batch_size=4, eval_every=1, eval_size=8, log=lines.append)
    assert info["steps"] == 2 and len(lines) == 2 and 0.0 <= info["held_out_recall"] <= 1.0
    ablation = train.ablation(model, mqar.make_batch(4, generator=torch.Generator().manual_seed(0)))
    mixers = ["linear_attn" if t == "linear_attention" else "self_attn" for t in model.config.layer_types]
    assert set(ablation) == {"none"} | {
        f"layers.{i}.{n}" for i, m in enumerate(mixers) for n in ("mlp", m, f"{m}[context]", f"{m}[queries]")
    }
    train.save(model, info, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("kind", mqar.CORRUPTIONS)
def test_demo_prompts_change_the_answer(toy, kind):
    """The demo's corruptions: one token changed where the kind says, and a different answer."""
    model, _ = toy
    clean, bad, info = mqar.demo_prompts(0, kind)
    where = {"key": info["key_position"], "value": info["value_position"], "query": info["query_position"]}[kind]
    assert info["corrupt"] == kind and info["corrupted_positions"] == [where]
    assert clean.shape == bad.shape and (clean != bad).sum() == 1
    with torch.no_grad():
        a, b = (int(model(input_ids=x).logits[0, -1].argmax()) for x in (clean, bad))
    assert a != b
    with pytest.raises(ValueError, match="the corruption must be one of key, value, query; got 'pair'"):
        mqar.demo_prompts(0, "pair")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_answer_attribution_peaks_at_the_queried_pair(toy, seed):
    """Exact direct attribution of logit(answer) - logit(corrupted answer) at the query, layer 0
    (where the recall lives): the largest source contribution sits where the queried key and
    value are written together, i.e. a position whose conv window s-3..s holds both."""
    import gdn_intervene as gi
    from gdn_intervene.analysis import attribution_for

    model, _ = toy
    gi.patch(model)
    clean, bad, info = mqar.demo_prompts(seed, "key")
    with torch.no_grad():
        answers = tuple(int(model(input_ids=x).logits[0, -1].argmax()) for x in (clean, bad))
    att = attribution_for(model, clean, direction=answers, layers=[0])
    per_source = att.contributions[0, 0, :, 0].sum(0)  # [T], summed over heads
    peak = int(per_source.argmax())
    assert info["value_position"] <= peak <= info["key_position"] + 3, (peak, info)
    window = per_source[info["value_position"] : info["key_position"] + 4].sum()
    assert window > 0.6 * per_source.clamp(min=0).sum()
