"""DeepSeek Sparse Attention: the lightning indexer, sparse attention on the latent cache, the indexer's KL."""

import json

import pytest
import torch
from conftest import build, main_in_process, project

from nanods.layers.attention.dsa import DeepSeekSparseAttention
from nanods.layers.attention.indexer import ranks, top_positions
from nanods.layers.attention.mla import MultiHeadLatentAttention

DSA = dict(attention="dsa", q_lora_rank=16, index_n_heads=4, index_head_dim=16)


def _dsa(seed=0, **overrides):
    return build(seed, **{**DSA, **overrides})


def test_dsa_with_topk_at_least_the_context_is_mla(float64):
    mla = build(0, attention="mla", q_lora_rank=16).eval()
    dsa = _dsa(index_topk=64).eval()
    missing, unexpected = dsa.load_state_dict(mla.state_dict(), strict=False)
    assert not unexpected and missing and all(".indexer." in k for k in missing)  # an mla checkpoint initialises it
    x = torch.randint(0, 128, (2, 40))
    torch.testing.assert_close(dsa(x), mla(x), rtol=0, atol=1e-12)


def _reference(attn: DeepSeekSparseAttention, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Dense MLA (keys and values decompressed) with every unpicked position masked: the definition."""
    q_nope, q_pe, q_latent = attn.queries(x, pos)
    latent, keys = attn.latent(x, pos), attn.indexer.keys(x, pos)
    picks, valid = attn.indexer.select(x, q_latent, pos, keys, 0, attn.topk)
    B, T, _ = x.shape
    allowed = torch.zeros(B, T, T, dtype=torch.bool).scatter(-1, picks, valid)
    c_kv, k_pe = latent.split([attn.rank, attn.rope], dim=-1)
    k_nope, v = attn.wkv_b(c_kv).view(B, T, attn.n_head, -1).split([attn.nope, attn.v_dim], dim=-1)
    q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
    k = torch.cat([k_nope, k_pe[:, :, None].expand(B, T, attn.n_head, attn.rope)], dim=-1).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) * attn.softmax_scale
    weights = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
    return attn.output((weights @ v.transpose(1, 2)).transpose(1, 2))


@pytest.mark.parametrize("path", ["gathered", "masked", "inference"])
def test_sparse_attention_equals_dense_attention_masked_to_the_picks(path, float64, monkeypatch):
    """Training gathers the picks or masks the rest (with the weights for the indexer's target);
    inference gathers them for SDPA. Each equals the definition."""
    monkeypatch.setattr("nanods.layers.attention.dsa.MASKED_SCORES", 0 if path == "gathered" else 1 << 22)
    attn = _dsa(index_topk=6).blocks[0].attn.train(path != "inference")
    x = torch.randn(2, 30, 64)
    pos = torch.arange(30).expand(2, 30)
    torch.testing.assert_close(attn(x, pos), _reference(attn, x, pos))
    assert not torch.allclose(attn(x, pos), MultiHeadLatentAttention.forward(attn, x, pos))  # it is sparse
    if path == "inference":
        return
    losses = {}
    for name in ("gathered", "masked"):  # the indexer's target over the picks is the same either way
        monkeypatch.setattr("nanods.layers.attention.dsa.MASKED_SCORES", 0 if name == "gathered" else 1 << 22)
        attn(x, pos)
        losses[name] = attn.indexer_loss
    torch.testing.assert_close(losses["gathered"], losses["masked"])


@pytest.mark.parametrize("ties", [True, False])
def test_ties_go_to_the_earlier_position_whatever_the_row_length(ties):
    """The picks are the stable sort's (score, then position), so a cached decode step over a
    prefix picks what the full forward's row picks: ReLU makes exact ties common."""
    torch.manual_seed(0)
    scores = torch.randn(3, 50)
    if ties:  # 5 positive scores, 10 negative, the rest 0.0 or -0.0
        scores = torch.zeros(3, 50).scatter_(1, torch.rand(3, 50).argsort(dim=1)[:, :15],
                                             torch.cat([torch.rand(3, 5), -torch.rand(3, 10)], 1))
        scores[:, 2] = -0.0
    for length in (10, 31, 50):
        visible = torch.arange(50) < length
        masked = scores.masked_fill(~visible, float("-inf"))
        expected = masked.sort(dim=-1, descending=True, stable=True).indices[:, :8].sort(dim=-1).values
        for picks in (top_positions(masked, 8), ranks(masked).topk(8, dim=-1).indices):
            assert torch.equal(picks.sort(dim=-1).values, expected)
        short = top_positions(scores[:, :length], 8)
        assert torch.equal(short.sort(dim=-1).values, expected)


def test_indexer_scores_follow_the_formula(float64):
    """I(t, s) = sum_j w(t, j) ReLU(q(t, j) . k(s)), scaled by head_dim^-0.5 n_heads^-0.5, written out."""
    attn = _dsa().blocks[0].attn
    ix = attn.indexer
    x, pos = torch.randn(1, 7, 64), torch.arange(7)[None]
    _, _, q_latent = attn.queries(x, pos)
    keys = ix.keys(x, pos)
    q = ix.wq_b(q_latent).view(1, 7, ix.n_heads, ix.head_dim)
    q = torch.cat([apply_half_rope(q[..., :ix.rope], pos), q[..., ix.rope:]], dim=-1)
    k = ix.k_norm(ix.wk(x))
    k = torch.cat([apply_half_rope(k[:, :, None, :ix.rope], pos)[:, :, 0], k[..., ix.rope:]], dim=-1)
    torch.testing.assert_close(keys, k)
    w = ix.weights_proj(x)
    expected = torch.zeros(1, 7, 7)
    for t in range(7):
        for s in range(7):
            expected[0, t, s] = sum(w[0, t, j] * torch.relu(q[0, t, j] @ k[0, s]) for j in range(ix.n_heads))
    expected *= ix.head_dim ** -0.5 * ix.n_heads ** -0.5
    torch.testing.assert_close(ix.scores(x, q_latent, pos, keys).double(), expected)


def test_training_under_bf16_autocast_scores_in_float32():
    """Autocast makes the indexer's q and keys bf16; q.k and the sum over heads still run in float32 (the
    ranking and the KL need them), not as a bf16 matmul rounding every dot to 8 bits."""
    ix = _dsa().blocks[0].attn.indexer
    x, q_latent, pos = torch.randn(2, 30, 64), torch.randn(2, 30, 16), torch.arange(30).expand(2, 30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        keys = ix.keys(x, pos)
        got = ix.scores(x, q_latent, pos, keys)
        q = ix._rotate(ix.wq_b(q_latent).view(2, 30, ix.n_heads, ix.head_dim), pos)
        w = ix.weights_proj(x)
    assert keys.dtype == q.dtype == torch.bfloat16 and got.dtype == torch.float32
    dots = torch.einsum("bthd,bsd->bths", q.float(), keys.float()).relu()
    expected = torch.einsum("bth,bths->bts", w.float(), dots) * ix.head_dim ** -0.5 * ix.n_heads ** -0.5
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def apply_half_rope(t, pos, theta=10000.0):
    """RoPE on pairs (i, i + d/2), written out: the indexer's layout (not MLA's interleaved one)."""
    d = t.size(-1)
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = pos[..., None, None].double() * freqs  # (B, T, 1, d/2)
    a, b = t[..., : d // 2], t[..., d // 2:]
    return torch.cat([a * angles.cos() - b * angles.sin(), b * angles.cos() + a * angles.sin()], dim=-1)


def test_selection_is_causal_and_cached_decoding_equals_the_full_forward(float64):
    model = _dsa(index_topk=6).eval()
    x = torch.randint(0, 128, (2, 40))
    y = x.clone()
    y[:, 25] = (y[:, 25] + 1) % 128
    full = model(x)
    torch.testing.assert_close(model(y)[:, :25], full[:, :25], rtol=0, atol=1e-12)
    cache = model.init_cache(2, 40)
    steps = [model(x[:, :12], cache=cache)] + [model(x[:, t:t + 1], cache=cache, start_pos=t) for t in range(12, 40)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full)
    total = sum(b.numel() * b.element_size() for c in cache for b in c.buffers.values())
    assert total == model.kv_cache_bytes_per_token(torch.float64) * 40 * 2  # the indexer keys are counted


@pytest.mark.parametrize("dense", [True, False])
def test_the_indexer_learns_from_its_kl_alone_and_the_rest_from_the_lm_loss(dense):
    model = _dsa(index_topk=6, mtp_depth=1).train()  # the MTP block's attention is a DSA too
    for block in [*model.blocks, model.mtp[0].block]:
        block.attn.dense = dense
    x = torch.randint(0, 128, (2, 30))
    terms = model(x, x.roll(-1, 1), return_terms=True)
    assert terms.indexer > 0
    indexer = {n for n, _ in model.named_parameters() if ".indexer." in n}
    grads = torch.autograd.grad(terms.indexer, list(model.parameters()), allow_unused=True)
    reached = {n for (n, _), g in zip(model.named_parameters(), grads) if g is not None and g.abs().sum() > 0}
    assert reached == indexer
    grads = torch.autograd.grad(terms.ce, list(model.parameters()), allow_unused=True)
    reached = {n for (n, _), g in zip(model.named_parameters(), grads) if g is not None and g.abs().sum() > 0}
    assert not reached & indexer and len(reached) > 10


@pytest.mark.parametrize("dense", [True, False])
def test_an_indexer_that_scores_every_position_alike_has_the_uniform_kl(dense, float64):
    attn = _dsa(index_topk=6).blocks[0].attn.train()
    attn.dense = dense
    x, pos = torch.randn(2, 30, 64), torch.arange(30).expand(2, 30)
    attn(x, pos)
    learned, uniform = attn.indexer_loss, attn.indexer_uniform
    assert 0 < learned and 0 < uniform and not torch.isclose(learned, uniform)
    with torch.no_grad():
        attn.indexer.weights_proj.weight.zero_()  # every score 0: the indexer's softmax is uniform
    attn(x, pos)
    torch.testing.assert_close(attn.indexer_loss, attn.indexer_uniform)
    torch.testing.assert_close(attn.indexer_uniform, uniform)  # the attention is the same


@pytest.mark.parametrize("sets,message", [
    (["model.q_lora_rank=0"], "needs query compression"),
    (["model.index_topk=0"], "index_topk"),
    (["model.index_head_dim=15"], "index_head_dim (15) must be even"),
    (["model.index_head_dim=4"], "index_head_dim (4) must be >= qk_rope_head_dim (8)"),
])
def test_bad_dsa_settings_are_one_line(sets, message, capsys):
    args = ["inspect", "--scale", "tiny", "--set", "model.attention=dsa"] + [a for s in sets for a in ("--set", s)]
    code, out, err = main_in_process(args, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and message in lines[0], err


def test_continued_training_warms_the_indexer_up_alone_then_trains_sparse(corpus, tmp_path):
    from nanods import checkpoint
    from nanods.train.loop import RunOptions, train

    assert train(project(corpus, tmp_path / "mla", "train.steps=6"), RunOptions()) == 0
    base, _ = checkpoint.load(tmp_path / "mla" / "ckpt.safetensors")
    opts = RunOptions(init_from=str(tmp_path / "mla" / "ckpt.safetensors"),
                      explicit={"model": {"attention": "dsa", "index_topk": 8}})
    sets = ["model.attention=dsa", "model.index_topk=8", "train.steps=6", "train.dsa_dense_steps=4"]
    assert train(project(corpus, tmp_path / "dsa", *sets), opts) == 0
    rows = [json.loads(line) for line in (tmp_path / "dsa" / "metrics.jsonl").read_text().splitlines()]
    stages = [r["dsa_stage"] for r in rows if "loss" in r]
    assert stages == ["dense, frozen"] * 4 + ["sparse"] * 2
    assert all(r["indexer"] > 0 for r in rows if "loss" in r)
    # the frozen warm-up changed the indexer only: the step-4 checkpoint's other weights are the mla ones
    checkpoint_4 = tmp_path / "warm"
    assert train(project(corpus, checkpoint_4, *sets[:2], "train.steps=4", "train.dsa_dense_steps=4"),
                 RunOptions(init_from=opts.init_from, explicit=opts.explicit)) == 0
    warm, _ = checkpoint.load(checkpoint_4 / "ckpt.safetensors")
    for name, value in base.state_dict().items():
        assert torch.equal(warm.state_dict()[name], value), name
    first = warm.state_dict()["blocks.0.attn.indexer.wk.weight"]
    assert not torch.equal(first, checkpoint.load(tmp_path / "dsa" / "ckpt.safetensors")[0].state_dict()[
        "blocks.0.attn.indexer.wk.weight"])


def test_init_from_refuses_an_attention_change_other_than_mla_to_dsa(corpus, tmp_path):
    from nanods.errors import NanodsError
    from nanods.train.loop import RunOptions, train

    assert train(project(corpus, tmp_path / "mla", "train.steps=2"), RunOptions()) == 0
    opts = RunOptions(init_from=str(tmp_path / "mla" / "ckpt.safetensors"), explicit={"model": {"attention": "mha"}})
    with pytest.raises(NanodsError, match="can only change from mla to dsa"):
        train(project(corpus, tmp_path / "mha", "model.attention=mha", "train.steps=2"), opts)


def test_init_from_options_adjust_the_checkpoints_model(corpus, tmp_path, capsys, monkeypatch):
    """Without --scale or a nanods.toml, the options are checked against the checkpoint's model, not the
    defaults': tiny's index_head_dim 8 is below the default model's rope width (64). The index_topk the
    mla model stored (unused by it) gives way to the default."""
    from nanods import checkpoint
    from nanods.train.loop import RunOptions, train

    assert train(project(corpus, tmp_path / "mla", "train.steps=2", "model.index_topk=99"), RunOptions()) == 0
    monkeypatch.chdir(tmp_path)
    args = ["train", "--init-from", str(tmp_path / "mla" / "ckpt.safetensors"), "--attention", "dsa",
            "--set", "model.index_head_dim=8", "--steps", "1", "--out", str(tmp_path / "dsa"), "--device", "cpu",
            "--set", f"train.data={json.dumps(corpus)}", "--set", "train.seq_len=32", "--set", "train.batch_size=2",
            "--set", "train.eval_batches=1", "--set", "train.sample_tokens=0"]
    code, _, err = main_in_process(args, capsys)
    assert code == 0, err
    config = checkpoint.load(tmp_path / "dsa" / "ckpt.safetensors")[0].config
    assert (config.index_head_dim, config.index_topk) == (8, 16)  # 16: max(16, sequence_len 64 // 16)
