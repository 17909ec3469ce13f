"""The checks activation and attribution patching share, each run before any forward: prompt
pairs, sites, the LM head, answers, left padding and position labels. Each failure is one line
(a ValueError) naming what was expected and what came."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..hooking.locate import as_module
from ..sites import site

__all__ = ["answer_pair", "check_answers", "check_pair", "check_sites", "left_padding", "token_labels", "vocabulary"]


def check_pair(clean_ids, corrupt_ids, what: str, *, one: bool) -> None:
    """Prompt pairs of equal token length, as [1, T] (`one`) or [B, T] integer tensors."""
    ok = all(
        isinstance(x, torch.Tensor) and x.dim() == 2 and not x.is_floating_point() for x in (clean_ids, corrupt_ids)
    )
    if not ok or clean_ids.shape != corrupt_ids.shape or (one and clean_ids.shape[0] != 1):
        shape = lambda x: list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__  # noqa: E731
        raise ValueError(
            f"{what} needs {'one clean and one corrupted prompt' if one else 'clean and corrupted prompts'} of equal "
            f"token length, as {'[1, T]' if one else '[B, T]'} token ids; got clean {shape(clean_ids)} and corrupted "
            f"{shape(corrupt_ids)}"
        )


def check_sites(sites: Sequence[str]) -> tuple[str, ...]:
    """The site names as a tuple; an unknown name raises, listing the sites."""
    names = tuple(sites)
    for n in names:
        site(n)
    if not names:
        raise ValueError("sites must name at least one site")
    return names


def vocabulary(model, what: str) -> int:
    """The size of `model`'s LM head (the metric reads its logits); a model without one (a bare
    decoder from AutoModel) is refused in one line."""
    module = as_module(model)
    head = getattr(module, "get_output_embeddings", lambda: None)()
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(
            f"{what} compares the logits of two answers, and {type(module).__name__} has no LM head (a bare decoder, "
            "e.g. from AutoModel): load it with its head (AutoModelForCausalLM)"
        )
    return weight.shape[0]


def check_answers(answers, B: int, V: int) -> None:
    """Raise unless `answers` is None or (clean, corrupt) token ids in [0, V), each one id or
    [B] ids."""
    if answers is None:
        return
    if not isinstance(answers, (tuple, list)) or len(answers) != 2:
        raise ValueError(f"answers must be (clean answer, corrupt answer) token ids; got {answers!r}")
    for which, x in zip(("clean", "corrupt"), answers):
        t = torch.as_tensor(x)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.dim() > 1 or t.numel() not in (1, B):
            raise ValueError(f"answers: the {which} answer must be one token id or [B] = [{B}] of them; got {x!r}")
        if ((t < 0) | (t >= V)).any():
            raise ValueError(f"answers: the {which} answer {t.tolist()} is not a token id in [0, {V})")


def answer_pair(answers, last: dict, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean answers [B], corrupt answers [B]): given, or each run's argmax at the last position
    (`last`: {"clean": logits [B, V], "corrupt": logits [B, V]})."""
    if answers is None:
        return last["clean"].argmax(-1), last["corrupt"].argmax(-1)
    return tuple(torch.as_tensor(x, dtype=torch.long).expand(B).clone() for x in answers)


def left_padding(mask, shape: torch.Size) -> list[int]:
    """Each row's first token ([B] ints) under a left-padding `mask` [B, T] (None: no padding);
    any other mask raises, naming what was expected and what came."""
    B, T = shape
    if mask is None:
        return [0] * B
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, T):
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"attention_mask must be [B, T] = {[B, T]} like the prompts (1 = token, 0 = left padding); got {got}"
        )
    m = mask.detach().to("cpu", torch.long)
    if not ((m == 0) | (m == 1)).all():
        raise ValueError(f"attention_mask must hold 0 and 1 only; got values {sorted(set(m.unique().tolist()))}")
    n = m.sum(1)
    bad = [r for r in range(B) if n[r] == 0 or not m[r, T - int(n[r]) :].all()]
    if bad:
        raise ValueError(
            f"attention_mask row {bad[0]} is not left padding (0s, then 1s through the last position, at least one "
            f"token): {m[bad[0]].tolist()}; the metric reads each row's last position"
        )
    return [T - int(k) for k in n]


def token_labels(tokens, shape: torch.Size, starts: list[int]) -> list[list[str]] | None:
    """Each pair's position labels, its own tokens only; `tokens`: None, T labels (B = 1), or B
    lists, each of T labels or of its pair's own length. Raises on any other count."""
    if tokens is None:
        return None
    B, T = shape
    rows = [tokens] if B == 1 and not (len(tokens) and isinstance(tokens[0], (list, tuple))) else list(tokens)
    if len(rows) != B:
        raise ValueError(f"tokens must hold one list of labels per pair, [B] = [{B}] lists; got {len(rows)}")
    out = []
    for r, (row, start) in enumerate(zip(rows, starts)):
        row = [str(x) for x in row]
        row = row[start:] if len(row) == T else row
        if len(row) != T - start:
            where = "tokens" if B == 1 else f"tokens[{r}]"
            raise ValueError(
                f"{where} must label the pair's {T - start} tokens (or all T = {T} positions); got {len(row)} labels"
            )
        out.append(row)
    return out
