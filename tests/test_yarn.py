"""YaRN rope scaling against transformers' own functions and its DeepseekV3ForCausalLM, and plain RoPE at factor 1."""

import math

import pytest
import torch
from conftest import build

from nanods import NanoDeepSeek, NanoDeepSeekConfig
from nanods.layers.attention.mla import LATENT_NORM_EPS
from nanods.layers.rope import Rope, apply_rope

transformers = pytest.importorskip("transformers", reason="YaRN parity is checked against transformers' DeepseekV3")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402
from transformers.modeling_rope_utils import _compute_yarn_parameters  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (  # noqa: E402
    DeepseekV3Attention,
    DeepseekV3RotaryEmbedding,
    apply_rotary_pos_emb,
)

# (theta, rope dim, factor, original_len, beta_fast, beta_slow, mscale, mscale_all_dim)
CASES = [
    (10000.0, 64, 40.0, 4096, 32.0, 1.0, 1.0, 1.0),  # the released DeepSeek-V3
    (10000.0, 64, 40.0, 4096, 32.0, 1.0, 0.707, 0.707),  # DeepSeek-V2's mscales
    (500.0, 16, 4.0, 64, 32.0, 1.0, 1.0, 0.0),  # no mscale_all_dim: the cos/sin scale carries YaRN's temperature
    (10000.0, 32, 16.0, 512, 32.0, 1.0, 2.0, 1.0),  # unequal mscales: cos/sin scale != 1 and a softmax factor
    (1e6, 128, 2.5, 1024, 16.0, 2.0, 1.0, 0.0),
    (10000.0, 8, 3.0, 4096, 32.0, 32.0, 1.0, 1.0),  # an empty ramp (low == high)
]


def rope_of(case) -> Rope:
    theta, _, factor, original, beta_fast, beta_slow, mscale, mscale_all_dim = case
    return Rope(theta, factor, original, beta_fast, beta_slow, mscale, mscale_all_dim)


def hf_config(case, **overrides) -> DeepseekV3Config:
    theta, dim, factor, original, beta_fast, beta_slow, mscale, mscale_all_dim = case
    rope = dict(rope_type="yarn", rope_theta=theta, factor=factor, original_max_position_embeddings=original,
                beta_fast=beta_fast, beta_slow=beta_slow, mscale=mscale, mscale_all_dim=mscale_all_dim)
    values = dict(qk_rope_head_dim=dim, max_position_embeddings=round(original * factor), rope_parameters=rope)
    return DeepseekV3Config(**{**values, **overrides})


@pytest.mark.parametrize("case", CASES)
def test_frequencies_and_attention_factor_equal_transformers(case):
    inv_freq, attention_factor = _compute_yarn_parameters(hf_config(case))
    rope = rope_of(case)
    torch.testing.assert_close(rope.inv_freq(case[1]), inv_freq, rtol=1e-6, atol=0)
    assert rope.attention_factor == pytest.approx(attention_factor, rel=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_mla_softmax_scale_equals_transformers(case):
    theta, dim, factor, original, beta_fast, beta_slow, mscale, mscale_all_dim = case
    config = NanoDeepSeekConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=16, qk_rope_head_dim=dim, qk_nope_head_dim=16,
                                rope_theta=theta, rope_factor=factor, rope_original_len=original, rope_beta_fast=beta_fast,
                                rope_beta_slow=beta_slow, rope_mscale=mscale, rope_mscale_all_dim=mscale_all_dim)
    with torch.device("meta"):
        ours = NanoDeepSeek(config).blocks[0].attn.softmax_scale
        theirs = DeepseekV3Attention(hf_config(case, hidden_size=32, num_attention_heads=2, qk_nope_head_dim=16), 0)
    assert ours == pytest.approx(theirs.scaling, rel=1e-12)
    assert ours == pytest.approx((16 + dim) ** -0.5 * (0.1 * mscale_all_dim * math.log(factor) + 1) ** 2)


@pytest.mark.parametrize("case", CASES[:4])
def test_rotation_equals_transformers_rotate_half(case):
    """apply_rope (pairs (i, i + D/2), as MHA and MLA use it) against transformers' cos/sin and rotate_half."""
    dim = case[1]
    rotary = DeepseekV3RotaryEmbedding(hf_config(case))
    x = torch.randn(2, 7, 3, dim)
    pos = torch.tensor([[0, 1, 5, 100, 4095, 4096, 90000], [3, 17, 2048, 8191, 30000, 100000, 163839]])
    cos, sin = rotary(x, pos)
    expected, _ = apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), cos, sin)
    torch.testing.assert_close(apply_rope(x, pos, rope_of(case)), expected.transpose(1, 2), rtol=1e-4, atol=1e-4)


def plain_rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """The rope as it was before YaRN, verbatim."""
    D = x.size(-1)
    f = theta ** (-torch.arange(0, D, 2, dtype=torch.float32, device=pos.device) / D)
    angles = pos.unsqueeze(-1).unsqueeze(-1).float() * torch.cat([-f, f])
    xf = x.float()
    return torch.addcmul(xf * angles.cos(), xf.roll(D // 2, dims=-1), angles.sin()).to(x.dtype)


def test_factor_one_is_the_plain_rope_exactly():
    x, pos = torch.randn(2, 9, 3, 16), torch.randint(0, 5000, (2, 9))
    for rope in (Rope(theta=500.0), Rope(theta=500.0, mscale=2.0, mscale_all_dim=0.0), 500.0):
        assert torch.equal(apply_rope(x, pos, rope), plain_rope(x, pos, 500.0))
    rope = Rope.from_config(NanoDeepSeekConfig())
    assert (rope.factor, rope.attention_factor, rope.softmax_factor) == (1.0, 1.0, 1.0)
    model = build(attention="mla", ffn="dense", qk_nope_head_dim=16, qk_rope_head_dim=8)
    assert model.blocks[0].attn.softmax_scale == 24 ** -0.5  # exactly the unscaled one


def test_mha_takes_the_yarn_rope_but_not_the_softmax_factor(monkeypatch):
    yarn = dict(rope_factor=4.0, rope_original_len=16, rope_mscale=2.0, rope_mscale_all_dim=1.0)
    plain, scaled = build(attention="mha", ffn="dense"), build(attention="mha", ffn="dense", **yarn)
    scaled.load_state_dict(plain.state_dict())
    attn = scaled.blocks[0].attn
    assert attn.rotary == Rope.from_config(scaled.config) and attn.rotary.attention_factor != 1
    scales = []
    monkeypatch.setattr(attn, "attend", lambda q, k, v, scale, past: scales.append(scale) or type(attn).attend(q, k, v, scale, past))
    idx = torch.randint(0, 128, (1, 40))
    assert not torch.allclose(scaled(idx), plain(idx))
    assert scales == [attn.head_dim ** -0.5]


def test_latent_norms_keep_deepseeks_eps_whatever_norm_eps_is():
    model = build(attention="mla", ffn="dense", norm_eps=0.1)
    attn = model.blocks[0].attn
    assert attn.q_norm.eps == attn.kv_norm.eps == LATENT_NORM_EPS == 1e-6
    assert model.blocks[0].attn_norm.eps == model.norm.eps == 0.1


# ---------------------------------------------------------------------------------------------
# a whole model beside transformers' DeepseekV3ForCausalLM, weights mapped by hand

YARN = (1000.0, 16, 4.0, 256, 32.0, 1.0, 2.0, 1.0)  # a ramp over pairs 0..5; cos/sin scale and softmax factor != 1


def nanods_model(q_lora_rank: int) -> NanoDeepSeek:
    theta, dim, factor, original, beta_fast, beta_slow, mscale, mscale_all_dim = YARN
    torch.manual_seed(0)
    model = NanoDeepSeek(NanoDeepSeekConfig(
        n_layer=2, n_head=4, n_embd=64, vocab_size=128, sequence_len=1024, attention="mla", ffn="moe", first_k_dense=1,
        num_experts=4, top_k=2, n_shared_experts=1, moe_hidden=32, ffn_hidden=96, activation="swiglu",
        norm_weights=True, norm_eps=0.1, kv_lora_rank=16, q_lora_rank=q_lora_rank, qk_rope_head_dim=dim,
        qk_nope_head_dim=16, v_head_dim=16, rope_theta=theta, rope_factor=factor, rope_original_len=original,
        rope_beta_fast=beta_fast, rope_beta_slow=beta_slow, rope_mscale=mscale, rope_mscale_all_dim=mscale_all_dim))
    with torch.no_grad():  # unit-scale weights (logits of order 1, so a wrong scale shows), norms not all ones
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, p.size(-1) ** -0.5)
        for block in model.blocks[model.config.first_k_dense:]:
            block.ffn.router.expert_bias.uniform_(-0.05, 0.05)
    return model.eval()


def to_transformers(model: NanoDeepSeek, interleave: bool) -> DeepseekV3ForCausalLM:
    c = model.config
    hf = DeepseekV3ForCausalLM(hf_config(
        YARN, vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.ffn_hidden,
        moe_intermediate_size=c.moe_hidden, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        num_key_value_heads=c.n_head, n_shared_experts=c.n_shared_experts, n_routed_experts=c.num_experts,
        routed_scaling_factor=c.route_scale, kv_lora_rank=c.kv_lora_rank, q_lora_rank=c.q_lora_rank or None,
        qk_nope_head_dim=c.qk_nope_head_dim, v_head_dim=c.v_head_dim, n_group=1, topk_group=1,
        num_experts_per_tok=c.top_k, first_k_dense_replace=c.first_k_dense, norm_topk_prob=c.route_norm,
        max_position_embeddings=c.sequence_len, rms_norm_eps=c.norm_eps, rope_interleave=interleave,
        tie_word_embeddings=False, attn_implementation="eager")).eval()
    rope = c.qk_rope_head_dim
    # transformers rotates pairs (2i, 2i + 1) when interleaved: its row perm[j] is our row j
    perm = torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)]) if interleave else torch.arange(rope)

    def rope_rows(w: torch.Tensor, heads: int, width: int) -> torch.Tensor:
        """Each head's last `rope` rows (of `width`) laid out as transformers reads them."""
        out = w.clone().view(heads, width, -1)
        out[:, width - rope + perm] = w.view(heads, width, -1)[:, width - rope:]
        return out.view_as(w)

    sd = model.state_dict()
    new = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    qk = c.qk_nope_head_dim + rope
    for i in range(c.n_layer):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        new[h + "input_layernorm.weight"] = sd[p + "attn_norm.weight"]
        new[h + "post_attention_layernorm.weight"] = sd[p + "ffn_norm.weight"]
        a = h + "self_attn."
        if c.q_lora_rank:
            new[a + "q_a_proj.weight"] = sd[p + "attn.wq_a.weight"]
            new[a + "q_a_layernorm.weight"] = sd[p + "attn.q_norm.weight"]
            new[a + "q_b_proj.weight"] = rope_rows(sd[p + "attn.wq_b.weight"], c.n_head, qk)
        else:
            new[a + "q_proj.weight"] = rope_rows(sd[p + "attn.wq.weight"], c.n_head, qk)
        new[a + "kv_a_proj_with_mqa.weight"] = rope_rows(sd[p + "attn.wkv_a.weight"], 1, c.kv_lora_rank + rope)
        new[a + "kv_a_layernorm.weight"] = sd[p + "attn.kv_norm.weight"]
        new[a + "kv_b_proj.weight"] = sd[p + "attn.wkv_b.weight"]
        new[a + "o_proj.weight"] = sd[p + "attn.wo.weight"]
        if i < c.first_k_dense:
            mlps = {"mlp.": p + "ffn."}
        else:
            mlps = {"mlp.shared_experts.": p + "ffn.shared."}
            new[h + "mlp.gate.weight"] = sd[p + "ffn.router.weight"]
            new[h + "mlp.gate.e_score_correction_bias"] = sd[p + "ffn.router.expert_bias"]
            new[h + "mlp.experts.gate_up_proj"] = sd[p + "ffn.experts.w_in"]
            new[h + "mlp.experts.down_proj"] = sd[p + "ffn.experts.w_out"]
        for theirs, ours in mlps.items():
            new[h + theirs + "gate_proj.weight"], new[h + theirs + "up_proj.weight"] = sd[ours + "w_in.weight"].chunk(2)
            new[h + theirs + "down_proj.weight"] = sd[ours + "w_out.weight"]
    missing, unexpected = hf.load_state_dict(new, strict=False)
    assert not unexpected and not [k for k in missing if "rotary_emb" not in k], (missing, unexpected)
    return hf


@pytest.mark.parametrize("interleave, q_lora_rank", [(False, 16), (True, 16), (True, 0)])
def test_logits_equal_transformers_deepseek_v3_with_yarn(interleave, q_lora_rank):
    model = nanods_model(q_lora_rank)
    hf = to_transformers(model, interleave)
    idx = torch.randint(0, 128, (2, 300), generator=torch.Generator().manual_seed(0))  # past original_len (256)
    with torch.no_grad():
        expected = hf(input_ids=idx).logits
        torch.testing.assert_close(model(idx), expected, atol=1e-4, rtol=0)
        cache = model.init_cache(2, 300)  # the absorbed decode on the latent cache takes the same scales
        decoded = torch.cat([model(idx[:, :290], cache=cache)]
                            + [model(idx[:, t:t + 1], cache=cache, start_pos=t) for t in range(290, 300)], dim=1)
    torch.testing.assert_close(decoded, expected, atol=1e-4, rtol=0)
