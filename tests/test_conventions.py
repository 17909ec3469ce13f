"""`_compat.convention` reads each release's GDN forward shape from the forward itself. These
stand-ins carry the lines that tell the five shapes apart (copied from HF's forwards of those
releases, the rest elided), so the detection is checked on every shape on any installed
release; the CI matrix then runs the real ones (tests marked `compat`)."""

from __future__ import annotations

import pytest

from gdn_intervene import _compat

# ruff: noqa: F821  (the bodies are read, never run)


class Hf4_57:
    def forward(self, hidden_states, cache_params=None, cache_position=None, attention_mask=None):
        use_precomputed_states = (
            cache_params is not None and cache_params.has_previous_state and seq_len == 1 and cache_position is not None
        )
        query = query.repeat_interleave(self.num_v_heads // self.num_k_heads, dim=2)
        o, S = self.chunk_gated_delta_rule(
            query,
            key,
            value,
            g=g,
            beta=beta,
            initial_state=None,
            output_final_state=cache_params is not None,
            use_qk_l2norm_in_kernel=True,
        )


class Hf5_5:
    def forward(self, hidden_states, cache_params=None, attention_mask=None):
        use_precomputed_states = (
            cache_params is not None and cache_params.has_previous_state(self.layer_idx) and seq_len == 1
        )
        query = query.repeat_interleave(self.num_v_heads // self.num_k_heads, dim=2)
        o, S = self.chunk_gated_delta_rule(
            query,
            key,
            value,
            g=g,
            beta=beta,
            initial_state=None,
            output_final_state=cache_params is not None,
            use_qk_l2norm_in_kernel=True,
        )


class Hf5_10:
    def forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
        use_precomputed_states = cache_params is not None and cache_params.has_previous_state(self.layer_idx)
        if use_precomputed_states:
            mixed_qkv = mixed_qkv[:, :, -seq_len:]
        query = query.repeat_interleave(self.num_v_heads // self.num_k_heads, dim=2)
        o, S = self.chunk_gated_delta_rule(
            query, key, value, g=g, beta=beta, initial_state=None, cu_seqlens=kwargs.get("cu_seq_lens_q")
        )


class Hf5_15:
    def forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
        use_precomputed_states = cache_params is not None and cache_params.has_previous_state(self.layer_idx)
        if cache_params is not None:
            mixed_qkv = mixed_qkv[:, :, -seq_len:]
        query = query.repeat_interleave(self.num_v_heads // self.num_k_heads, dim=2)
        o, S = torch_chunk_gated_delta_rule(
            query, key, value, g=g, beta=beta, cu_seqlens=kwargs.pop("cu_seq_lens_q", None), **kwargs
        )


class Hf5_24:
    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        use_precomputed_states = cache is not None and cache.get_recurrent_state(self.layer_idx) is not None
        o, S = torch_chunk_gated_delta_rule(
            query, key, value, g=g, beta=beta, cu_seqlens=kwargs.pop("cu_seq_lens_q", None), **kwargs
        )


C = _compat.Convention
EXPECTED = {
    Hf4_57: C("cache_params", True, True, False, "none", True, False, ("cache_position",)),
    Hf5_5: C("cache_params", True, True, False, "none", False, False, ()),
    Hf5_10: C("cache_params", True, True, True, "packed", False, False),
    Hf5_15: C("cache_params", True, False, True, "all", False, True),
    Hf5_24: C("cache", False, False, True, "all", False, True),
}


@pytest.mark.parametrize("cls", list(EXPECTED), ids=[c.__name__ for c in EXPECTED])
def test_each_release_shape_is_detected(cls):
    assert _compat.convention(cls) == EXPECTED[cls]


def test_kwargs_reach_the_kernels_as_each_shape_passes_them():
    assert _compat.route_kwargs(EXPECTED[Hf4_57], {"cache_position": 3}, True) == ({}, {}, {})
    with pytest.raises(TypeError, match=r"^Hf\.forward\(\) got an unexpected keyword argument 'seq_idx'$"):
        _compat.route_kwargs(EXPECTED[Hf4_57], {"cache_position": 3, "seq_idx": 0}, True, "Hf")  # as HF: not dropped
    kwargs = {"cu_seq_lens_q": "offsets", "seq_idx": "ids", "position_ids": "pos"}
    assert _compat.route_kwargs(EXPECTED[Hf5_10], kwargs, True) == ({"seq_idx": "ids"}, {"cu_seqlens": "offsets"}, {})
    conv, chunk, recurrent = _compat.route_kwargs(EXPECTED[Hf5_24], kwargs, True)
    assert conv == kwargs and chunk == recurrent == {"cu_seqlens": "offsets", "seq_idx": "ids", "position_ids": "pos"}
    assert _compat.route_kwargs(EXPECTED[Hf5_24], kwargs, False)[1] == kwargs  # KDA: passed on as they came
    assert kwargs == {"cu_seq_lens_q": "offsets", "seq_idx": "ids", "position_ids": "pos"}  # not consumed
