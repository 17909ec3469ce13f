"""Multi-query associative recall (MQAR, as in Zoology) for the bundled toy model.

A sequence with ``N = num_pairs`` pairs is (length ``4 * N + 2``)::

    <bos> k_a v_a k_b v_b ... (N context pairs) <sep> k_x v_x k_y v_y ... (N queries)

Context keys are distinct, and so are context values (so different keys always
have different answers). The queries are all N context keys in shuffled order,
each followed by its value (teacher forcing). Scored: the logits at each query key,
whose target is that key's value.

For causal tracing, :func:`prompt` builds the prefix of such a sequence that ends
with the first query key, and :func:`corrupt` the same prompt with the queried key
swapped for another context key (same length, different answer).

Keys and values are given as indices (``0 <= i < NUM_KEYS``); token ids come from
:func:`key_id` / :func:`value_id`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import CORRUPTIONS  # kept where the torch-free command line reads it

NUM_KEYS = 16
NUM_VALUES = 16

PAD, BOS, SEP, UNK = "<pad>", "<bos>", "<sep>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, SEP, UNK)
KEY_TOKENS = tuple(f"k{i}" for i in range(NUM_KEYS))
VALUE_TOKENS = tuple(f"v{i}" for i in range(NUM_VALUES))
VOCAB: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS + KEY_TOKENS + VALUE_TOKENS)}
VOCAB_SIZE = len(VOCAB)
PAD_ID, BOS_ID, SEP_ID, UNK_ID = (VOCAB[t] for t in SPECIAL_TOKENS)
KEY_OFFSET = VOCAB[KEY_TOKENS[0]]
VALUE_OFFSET = VOCAB[VALUE_TOKENS[0]]
IGNORE = -100  # target of unscored positions (the torch / HF ignore_index)

Pairs = Sequence[tuple[int, int]]  # (key index, value index)


def key_id(i: int) -> int:
    """Token id of key ``k{i}``."""
    if not 0 <= i < NUM_KEYS:
        raise ValueError(f"key index {i} not in [0, {NUM_KEYS})")
    return KEY_OFFSET + i


def value_id(j: int) -> int:
    """Token id of value ``v{j}``."""
    if not 0 <= j < NUM_VALUES:
        raise ValueError(f"value index {j} not in [0, {NUM_VALUES})")
    return VALUE_OFFSET + j


def seq_len(num_pairs: int) -> int:
    """Length of a :func:`make_batch` sequence: bos + 2N context + sep + 2N queries."""
    return 4 * num_pairs + 2


# ---------------------------------------------------------------- tokenizer


def build_tokenizer():
    """The word-level tokenizer: ``(tokenizers.Tokenizer, transformers.PreTrainedTokenizerFast)``.

    Splits on whitespace and prepends ``<bos>``, so ``tok("k1 v2 <sep> k1").input_ids``
    equals ``[BOS_ID, key_id(1), value_id(2), SEP_ID, key_id(1)]``.
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(dict(VOCAB), unk_token=UNK))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.post_processor = TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, BOS_ID)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, pad_token=PAD, unk_token=UNK)
    return tok, hf


# ---------------------------------------------------------------- batches


@dataclass(frozen=True)
class Batch:
    """A batch of MQAR sequences.

    input_ids: (n, L) long, ``L = seq_len(num_pairs)``.
    targets:   (n, L) long; ``targets[b, t]`` is the token expected from
               ``logits[b, t]`` (the value following a query key), ``IGNORE`` elsewhere.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """(n, L) bool: the scored positions (the query keys)."""
        return self.targets != IGNORE

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def query_positions(num_pairs: int) -> torch.Tensor:
    """(N,) long: positions of the query keys in a sequence."""
    return 2 * num_pairs + 2 + 2 * torch.arange(num_pairs)


def make_batch(n: int, *, num_pairs: int = 8, generator: torch.Generator) -> Batch:
    """``n`` random MQAR sequences of ``num_pairs`` pairs each (see module docstring)."""
    if not 1 <= num_pairs <= min(NUM_KEYS, NUM_VALUES):
        raise ValueError(f"num_pairs must be in [1, {min(NUM_KEYS, NUM_VALUES)}]")
    g = generator
    # argsort of uniform noise = a random permutation per row: distinct keys / values
    keys = torch.rand(n, NUM_KEYS, generator=g).argsort(-1)[:, :num_pairs] + KEY_OFFSET
    vals = torch.rand(n, NUM_VALUES, generator=g).argsort(-1)[:, :num_pairs] + VALUE_OFFSET
    order = torch.rand(n, num_pairs, generator=g).argsort(-1)
    context = torch.stack([keys, vals], -1).reshape(n, 2 * num_pairs)
    queries = torch.stack([keys.gather(1, order), vals.gather(1, order)], -1).reshape(n, 2 * num_pairs)
    col = lambda tok: torch.full((n, 1), tok, dtype=torch.long)  # noqa: E731
    input_ids = torch.cat([col(BOS_ID), context, col(SEP_ID), queries], 1)
    targets = torch.full_like(input_ids, IGNORE)
    qpos = query_positions(num_pairs)
    targets[:, qpos] = input_ids[:, qpos + 1]
    return Batch(input_ids, targets)


@torch.no_grad()
def recall(model, batch: Batch) -> float:
    """Fraction of scored positions where the model's argmax is the right value."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        logits = model(input_ids=batch.input_ids.to(device), use_cache=False).logits  # (n, L, V)
    finally:
        model.train(was_training)
    mask = batch.mask.to(device)
    hits = logits.argmax(-1)[mask] == batch.targets.to(device)[mask]
    return hits.float().mean().item()


# ---------------------------------------------------------------- prompts for causal tracing


@dataclass(frozen=True)
class Prompt:
    """A prompt that ends with a queried key.

    input_ids: (1, L) long, ``L = 2 * len(pairs) + 3``.
    answer:    token id the model should produce next (the queried key's value).
    query_key: the queried key index.
    text:      the prompt as text, without ``<bos>`` (the tokenizer adds it).
    """

    input_ids: torch.Tensor
    answer: int
    query_key: int
    text: str


def sample_pairs(num_pairs: int = 8, *, generator: torch.Generator) -> list[tuple[int, int]]:
    """``num_pairs`` (key, value) index pairs with distinct keys and distinct values."""
    b = make_batch(1, num_pairs=num_pairs, generator=generator).input_ids[0, 1 : 2 * num_pairs + 1]
    return [(int(k) - KEY_OFFSET, int(v) - VALUE_OFFSET) for k, v in b.view(-1, 2).tolist()]


def _check_pairs(pairs: Pairs) -> None:
    keys = [k for k, _ in pairs]
    vals = [v for _, v in pairs]
    if len(set(keys)) != len(keys) or len(set(vals)) != len(vals):
        raise ValueError("pairs must have distinct keys and distinct values")


def prompt(pairs: Pairs, query_key: int) -> Prompt:
    """``<bos> k v ... k v <sep> query_key``: the clean prompt; answer = value of query_key."""
    _check_pairs(pairs)
    values = dict(pairs)
    if query_key not in values:
        raise ValueError(f"query key {query_key} is not in the context")
    ids = [BOS_ID]
    for k, v in pairs:
        ids += [key_id(k), value_id(v)]
    ids += [SEP_ID, key_id(query_key)]
    words = [f"{KEY_TOKENS[k]} {VALUE_TOKENS[v]}" for k, v in pairs] + [SEP, KEY_TOKENS[query_key]]
    return Prompt(torch.tensor([ids]), value_id(values[query_key]), query_key, " ".join(words))


def corrupt(
    pairs: Pairs, query_key: int, *, other_key: int | None = None, generator: torch.Generator | None = None
) -> Prompt:
    """The prompt of ``prompt(pairs, query_key)`` with the query swapped for ``other_key``.

    ``other_key`` must be another context key; if None it is drawn at random among
    them (with ``generator``). Same token length as the clean prompt; since context
    values are distinct, the answer differs.
    """
    keys = [k for k, _ in pairs]
    if query_key not in keys:
        raise ValueError(f"query key {query_key} is not in the context")
    if other_key is None:
        others = [k for k in keys if k != query_key]
        other_key = others[int(torch.randint(len(others), (1,), generator=generator))]
    if other_key == query_key:
        raise ValueError("other_key must differ from query_key")
    return prompt(pairs, other_key)


# ---------------------------------------------------------------- the demo's prompts


class DemoPrompts(NamedTuple):
    """The clean and corrupted prompts of ``gdn-intervene demo``.

    clean, corrupt: (1, L) long, equal length.
    info: where the queried pair sits and what was corrupted: ``key_position``,
    ``value_position``, ``query_position``, ``corrupt`` (the kind) and ``corrupted_positions``.
    """

    clean: torch.Tensor
    corrupt: torch.Tensor
    info: dict


def demo_prompts(seed: int = 0, kind: str = "key") -> DemoPrompts:
    """The prompts of ``gdn-intervene demo``: 8 pairs drawn with ``seed``, one of them queried.

    kind="key": the queried pair's key in the context is replaced by a key absent from the
    context; "value": its value by an absent value; "query": the final query by another
    context key (one of ``CORRUPTIONS``; another kind raises ValueError).
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"the corruption must be one of {', '.join(CORRUPTIONS)}; got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    pairs = sample_pairs(8, generator=g)
    qi = int(torch.randint(len(pairs), (1,), generator=g))
    key, _ = pairs[qi]
    clean = prompt(pairs, key).input_ids
    ids = clean.clone()
    kpos, vpos = 1 + 2 * qi, 2 + 2 * qi
    if kind == "key":
        ids[0, kpos] = key_id(next(k for k in range(NUM_KEYS) if k not in dict(pairs)))
    elif kind == "value":
        used = {v for _, v in pairs}
        ids[0, vpos] = value_id(next(v for v in range(NUM_VALUES) if v not in used))
    else:
        ids = corrupt(pairs, key, generator=g).input_ids
    changed = (clean[0] != ids[0]).nonzero().flatten().tolist()
    info = {
        "key_position": kpos,
        "value_position": vpos,
        "query_position": ids.shape[1] - 1,
        "corrupt": kind,
        "corrupted_positions": changed,
    }
    return DemoPrompts(clean, ids, info)
