"""MLA: the cache holds only latent + rope key, and absorbed decode equals the naive path."""

import pytest
import torch
from conftest import build

from nanods.testing import cache_tensors


def test_cache_holds_latent_plus_rope_key_only():
    model = build(attention="mla", ffn="moe", n_embd=64, kv_lora_rank=24, qk_rope_head_dim=8).eval()
    cfg = model.config
    batch, length = 3, 40
    caches = model.init_cache(batch, length)
    assert len(caches) == cfg.n_layer
    for cache in caches:
        values = sum(t.numel() for t in cache_tensors(cache))  # every tensor it holds, not just the expected ones
        assert values == batch * length * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    # and decoding really writes into (only) those tensors
    model.generate(torch.randint(0, 128, (batch, 5)), 5, temperature=0)
    idx = torch.randint(0, 128, (batch, 6))
    model(idx, cache=caches)
    assert caches[0].length == 6 and caches[0].buffers["latent"][:, :6].abs().sum() > 0
    assert caches[0].buffers["latent"][:, 6:].abs().sum() == 0
    expected = cfg.n_layer * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    assert model.kv_cache_bytes_per_token(torch.bfloat16) == expected


@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_absorbed_equals_naive(float64, q_lora_rank):
    naive = build(attention="mla", ffn="dense", q_lora_rank=q_lora_rank, attention_options={"absorb": "never"}).eval()
    absorbed = build(attention="mla", ffn="dense", q_lora_rank=q_lora_rank, attention_options={"absorb": "always"}).eval()
    absorbed.load_state_dict(naive.state_dict())
    idx = torch.randint(0, 128, (2, 24))
    torch.testing.assert_close(absorbed(idx), naive(idx), atol=1e-10, rtol=0)
    # decode one token at a time on the latent cache, both ways
    outs = []
    for model in (naive, absorbed):
        cache = model.init_cache(2, 24)
        outs.append(torch.cat([model(idx[:, :8], cache=cache)]
                              + [model(idx[:, t:t + 1], cache=cache, start_pos=t) for t in range(8, 24)], dim=1))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-10, rtol=0)
    torch.testing.assert_close(outs[1], naive(idx), atol=1e-10, rtol=0)


def test_auto_absorbs_only_after_a_cached_prefix(monkeypatch):
    model = build(attention="mla", ffn="dense").eval()
    attn = model.blocks[0].attn
    calls = []
    monkeypatch.setattr(attn, "_attend_naive", lambda *a: calls.append("naive") or type(attn)._attend_naive(attn, *a))
    monkeypatch.setattr(attn, "_attend_absorbed", lambda *a: calls.append("absorbed") or type(attn)._attend_absorbed(attn, *a))
    model.generate(torch.randint(0, 128, (1, 4)), 3, temperature=0)
    assert calls == ["naive", "absorbed", "absorbed"]


def test_softmax_scale_uses_the_decompressed_head_width():
    model = build(attention="mla", ffn="dense", qk_nope_head_dim=16, qk_rope_head_dim=8)
    assert model.blocks[0].attn.softmax_scale == pytest.approx((16 + 8) ** -0.5)
