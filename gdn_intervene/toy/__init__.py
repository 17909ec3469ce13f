"""The bundled toy model: a tiny Gated DeltaNet / attention hybrid trained on MQAR.

>>> from gdn_intervene.toy import load_toy
>>> model, tokenizer = load_toy()            # offline, from TOY_PATH
>>> tokenizer("k3 v7 k1 v2 <sep> k1").input_ids   # <bos> is prepended
[1, 7, 27, 5, 22, 2, 5]

The task, batches, recall metric and clean / corrupted prompts are in
:mod:`gdn_intervene.toy.mqar`; the training script in :mod:`gdn_intervene.toy.train`.
"""

from __future__ import annotations

from pathlib import Path

TOY_PATH = Path(__file__).resolve().parent / "mqar"
#: What a corrupted demo prompt replaces: the queried pair's key in the context, its value, or
#: the final query (`mqar.demo_prompts`).
CORRUPTIONS = ("key", "value", "query")

__all__ = ["CORRUPTIONS", "TOY_PATH", "load_toy", "unloadable"]


def load_toy(**kw):
    """Load the bundled checkpoint: ``(Qwen3_5ForCausalLM in eval mode, PreTrainedTokenizerFast)``.

    ``kw`` is passed to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``dtype=``,
    ``attn_implementation=``). Reads only local files.
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    if (why := unloadable()) is not None:
        from .._compat import UnsupportedVersionError

        raise UnsupportedVersionError(why)
    kw.setdefault("local_files_only", True)
    model = AutoModelForCausalLM.from_pretrained(TOY_PATH, **kw).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(TOY_PATH, local_files_only=True)
    return model, tokenizer


def unloadable() -> str | None:
    """Why the installed transformers release cannot load the toy (a Qwen3.5 checkpoint), or None."""
    import transformers

    if getattr(transformers, "Qwen3_5ForCausalLM", None) is not None:
        return None
    return (
        f"the bundled toy model is a Qwen3.5 checkpoint, which transformers {transformers.__version__} cannot load; "
        "it needs a release with Qwen3.5 (tested: 5.5 on; the library itself supports 4.57 on)"
    )
