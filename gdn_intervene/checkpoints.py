"""Which model the command-line tools and `doctor` run on: the bundled toy, or a checkpoint (a
directory or a hub id) loaded patched. Imports no torch until a model is loaded."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["TOY", "CheckpointError", "check_name", "load"]

TOY = "bundled MQAR toy"
# owner/name or name: what the hub accepts as a model id
_HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}")


class CheckpointError(ValueError):
    """A checkpoint name that is neither a directory nor a hub id, or one that cannot be loaded;
    one line."""


def check_name(model: str) -> None:
    """Raise `CheckpointError` unless `model` names a checkpoint directory or a hub id (owner/name),
    before anything is loaded."""
    p = Path(model).expanduser()
    if p.exists() and not p.is_dir():
        raise CheckpointError(f"--model {model}: a file, not a checkpoint directory")
    if not p.exists() and (not _HUB_ID.fullmatch(model) or "--" in model or ".." in model):
        raise CheckpointError(f"--model {model!r} is neither a directory nor a hub id (owner/name)")


def load(model: str | None, *, dtype: str = "float32", device="cpu", tokenizer: bool = True):
    """(patched model in eval mode on `device`, its tokenizer or None, its name): the bundled toy
    (`model` None) or a checkpoint, in `dtype` (a torch dtype's name)."""
    import torch

    from .patching import from_pretrained, patch

    dt = getattr(torch, dtype)
    if model is None:
        from .toy import load_toy

        m, tok = load_toy(dtype=dt)
        return patch(m).to(device), (tok if tokenizer else None), TOY
    check_name(model)
    try:
        m = from_pretrained(model, dtype=dt)
    except OSError as e:  # not found locally or on the hub, offline, gated, no config.json, ...
        raise CheckpointError(f"--model {model!r}: cannot load it ({_first_line(e)})") from None
    tok = None
    if tokenizer:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(model)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"--model {model!r}: cannot load its tokenizer ({_first_line(e)})") from None
    return m.to(device).eval(), tok, model


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
