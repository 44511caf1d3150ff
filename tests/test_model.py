"""The model as a whole: causal, batch rows independent, cached decode equal to the full forward, the loss
equal to a hand-computed cross-entropy, every parameter trained, no state changed by a forward, generate's
contract."""

import warnings

import pytest
import torch
from conftest import COMBOS, build, tiny_config

from nanods import NanoDeepSeekConfig, create_nano_deepseek, registry
from nanods.config import preset


@pytest.mark.parametrize("attention,ffn", COMBOS)
def test_a_few_steps_lower_the_loss(attention, ffn):
    model = build(attention=attention, ffn=ffn)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 128, (4, 33), generator=g)  # one fixed batch: the loss must fall
    losses = []
    for _ in range(15):
        loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("attention,ffn", COMBOS)
def test_a_later_token_never_changes_earlier_logits(float64, attention, ffn):
    model = build(attention=attention, ffn=ffn).eval()
    idx = torch.randint(0, 128, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (idx[:, 9] + 1) % 128
    before, after = model(idx), model(changed)
    torch.testing.assert_close(after[:, :9], before[:, :9], atol=1e-12, rtol=0)
    assert (after[:, 9:] - before[:, 9:]).abs().amax(-1).min() > 1e-6  # every later position sees the change


@pytest.mark.parametrize("attention,ffn", COMBOS)
def test_each_row_of_a_batch_is_computed_as_if_alone(float64, attention, ffn):
    """The MoE sorts the whole batch's tokens by expert: no row may leak into another."""
    model = build(attention=attention, ffn=ffn).eval()
    idx = torch.randint(0, 128, (3, 12))
    alone = torch.cat([model(idx[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(model(idx), alone, atol=1e-12, rtol=0)


@pytest.mark.parametrize("attention,ffn", COMBOS)
def test_incremental_decode_equals_full_forward(float64, attention, ffn):
    model = build(attention=attention, ffn=ffn).eval()
    idx = torch.randint(0, 128, (2, 20))
    full = model(idx)
    cache = model.init_cache(2, 20)
    pieces = [model(idx[:, :7], cache=cache)]  # prefill, then one token at a time
    pieces += [model(idx[:, t:t + 1], cache=cache, start_pos=t) for t in range(7, 12)]
    pieces.append(model(idx[:, 12:], cache=cache, start_pos=12))  # a multi-token chunk after a prefix
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-10, rtol=0)


@pytest.mark.parametrize("attention,ffn", COMBOS)
def test_incremental_decode_float32(attention, ffn):
    model = build(attention=attention, ffn=ffn).eval()
    idx = torch.randint(0, 128, (2, 16))
    full = model(idx)
    cache = model.init_cache(2, 16)
    inc = torch.cat([model(idx[:, :4], cache=cache)] + [model(idx[:, t:t + 1], cache=cache, start_pos=t)
                                                          for t in range(4, 16)], dim=1)
    torch.testing.assert_close(inc, full, rtol=1e-4, atol=1e-4)


def test_gqa_shares_kv_heads(float64):
    """n_kv_head=2 of 4: equal to MHA whose key/value heads are the GQA ones repeated."""
    gqa = build(attention="mha", ffn="dense", n_kv_head=2, n_layer=1).eval()
    mha = build(attention="mha", ffn="dense", n_kv_head=4, n_layer=1).eval()
    mha.load_state_dict({k: v for k, v in gqa.state_dict().items() if "wkv" not in k}, strict=False)
    k, v = gqa.blocks[0].attn.wkv.weight.view(2, 2, 16, 64).unbind(0)  # (kv_head, dim, C)
    rep = lambda w: w.repeat_interleave(2, dim=0).reshape(64, 64)  # noqa: E731
    mha.blocks[0].attn.wkv.weight.data = torch.cat([rep(k), rep(v)])
    idx = torch.randint(0, 128, (2, 12))
    torch.testing.assert_close(gqa(idx), mha(idx), atol=1e-10, rtol=0)


def test_generate_contract():
    model = build()
    idx = torch.randint(0, 128, (3, 5))
    state = torch.get_rng_state()
    a = model.generate(idx, 10, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    b = model.generate(idx, 10, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    assert torch.equal(torch.get_rng_state(), state), "generate touched the global RNG"
    assert a.shape == (3, 15) and torch.equal(a, b) and torch.equal(a[:, :5], idx)
    greedy = model.generate(idx, 10, temperature=0)
    logits = model.eval()(greedy[:, :-1])  # each greedy token is the argmax of the full forward
    assert torch.equal(logits[:, 4:].argmax(-1), greedy[:, 5:])


def test_stream_leaves_grad_mode_alone_between_tokens():
    from nanods.generate import stream

    model = build()
    for token in stream(model, torch.randint(0, 128, (2, 3)), 3, temperature=0):
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        loss = model(torch.cat([token[:, None], token[:, None]], dim=1), token[:, None].repeat(1, 2))
        loss.backward()  # a yielded token is an ordinary tensor
    assert model.training


def test_generate_never_samples_ids_beyond_the_tokenizer():
    model = build(tokenizer_vocab_size=100)
    with torch.no_grad():
        model.lm_head.weight[100:] += 10.0  # make padded ids the most likely
    out = model.generate(torch.zeros(4, 1, dtype=torch.long), 30, temperature=1.0, seed=0)
    assert int(out.max()) < 100


def test_generate_stops_rows_at_eos():
    model = build()
    idx = torch.randint(0, 128, (2, 3))
    first = model.generate(idx, 1, temperature=0)[:, -1]
    eos = int(first[0])  # row 0 emits eos at once; it must keep emitting it
    out = model.generate(idx, 6, temperature=0, eos_id=eos)
    assert (out[0, 3:] == eos).all()


def test_generate_refuses_beyond_sequence_len():
    model = build()
    with pytest.raises(ValueError, match="sequence_len"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), 10)


def test_tied_embeddings_are_one_parameter_trained_by_both_uses(float64):
    tied = build(tie_embeddings=True)
    assert tied.lm_head.weight is tied.embed.weight
    untied = build(tie_embeddings=False)
    assert len(list(tied.parameters())) == len(list(untied.parameters())) - 1
    untied.load_state_dict(tied.state_dict())  # equal weights, held twice
    idx = torch.randint(0, 128, (2, 9))
    for model in (tied, untied):
        model(idx[:, :-1], idx[:, 1:]).backward()
    both = untied.embed.weight.grad + untied.lm_head.weight.grad  # the tied gradient is the sum of the two uses
    torch.testing.assert_close(tied.embed.weight.grad, both, atol=1e-12, rtol=0)


@pytest.mark.parametrize("attention,ffn", COMBOS)
@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
def test_every_parameter_gets_a_gradient_from_one_batch(attention, ffn, activation):
    model = build(attention=attention, ffn=ffn, activation=activation, norm_weights=True)
    idx = torch.randint(0, 128, (4, 33))
    model(idx[:, :-1], idx[:, 1:]).backward()
    silent = [name for name, p in model.named_parameters()
              if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0]
    assert not silent, f"no gradient reaches {silent}"


def test_forward_backward_and_generate_change_no_weight_or_buffer(float64):
    """expert_bias moves only through the trainer's update; a forward is repeatable."""
    model = build(ffn="moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 128, (2, 9))
    model(idx[:, :-1], idx[:, 1:]).backward()  # training mode: routing, balance losses
    model.generate(idx, 4, temperature=1.0, seed=0)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert not changed, f"changed by a forward, backward or generate: {changed}"
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_create_nano_deepseek_is_the_small_preset_with_the_chosen_components():
    for use_mla in (False, True):
        for use_moe in (False, True):
            with torch.device("meta"):
                model = create_nano_deepseek(scale="small", use_mla=use_mla, use_moe=use_moe)
            attention, ffn = "mla" if use_mla else "mha", "moe" if use_moe else "dense"
            assert model.config == NanoDeepSeekConfig(**{**preset("small"), "attention": attention, "ffn": ffn})
            assert all(type(b.attn) is registry.get("attention", attention) for b in model.blocks)
            assert all(type(b.ffn) is registry.get("ffn", ffn) for b in model.blocks)


def test_first_k_dense_layers_are_dense():
    model = build(n_layer=3, first_k_dense=1)
    kinds = [type(b.ffn).__name__ for b in model.blocks]
    assert kinds == ["DenseFFN", "MoE", "MoE"]


def test_dist_prefixed_component_names_keep_their_meaning():
    config = tiny_config(attention="nanods:mla", ffn="nanods:moe", router="nanods:softmax")
    assert config.use_mla and config.use_moe and config.aux_loss_alpha == 0.01
    assert tiny_config(n_kv_head=3).use_mla  # n_kv_head means nothing for MLA


def test_top_k_zero_means_no_cut_and_top_k_one_is_greedy():
    model = build()
    start = torch.zeros(2, 2, dtype=torch.long)
    uncut = model.generate(start, 12, top_k=None, seed=0)
    assert torch.equal(model.generate(start, 12, top_k=0, seed=0), uncut)
    assert torch.equal(model.generate(start, 12, top_k=1, seed=0), model.generate(start, 12, temperature=0))
    assert not torch.equal(model.generate(start, 12, top_k=1, seed=0), uncut)  # sampling differs from greedy here


@pytest.mark.slow
@pytest.mark.parametrize("attention,ffn,options", [("mla", "moe", {}), ("mha", "dense", {}),
                                                    ("dsa", "moe", {"index_topk": 2})])  # sparse from the start
def test_compiled_decode_matches_eager(attention, ffn, options):
    model = build(attention=attention, ffn=ffn, **options).eval()
    prompt = torch.randint(0, 128, (1, 5))
    eager = model.generate(prompt, 12, temperature=0)
    compiled = model.generate(prompt, 12, temperature=0, compile=True)
    assert torch.equal(compiled, eager)
    with torch.compiler.set_stance("fail_on_recompile"):  # one compilation serves other positions and calls
        assert torch.equal(model.generate(prompt[:, :3], 20, temperature=0, compile=True),
                           model.generate(prompt[:, :3], 20, temperature=0))


def test_compiled_decode_refuses_batches_and_no_cache():
    from nanods.generate import stream

    model = build()
    with pytest.raises(ValueError, match="one sequence"):
        next(stream(model, torch.zeros(2, 3, dtype=torch.long), 4, compile=True))
    with pytest.raises(ValueError, match="one sequence"):
        next(stream(model, torch.zeros(1, 3, dtype=torch.long), 4, use_cache=False, compile=True))


@pytest.mark.parametrize("tie", [False, True])
def test_training_loss_equals_cross_entropy_of_the_logits(float64, tie):
    """The sliced head loss (nanods.layers.cross_entropy) inside the model, tied embeddings included."""
    model = build(tie_embeddings=tie)
    idx = torch.randint(0, 128, (2, 9))
    targets = idx[:, 1:].clone()
    targets[0, 2] = -1
    params = [p for p in model.parameters()]

    def grads(loss):
        return torch.autograd.grad(loss, params, allow_unused=True)

    loss = model(idx[:, :-1], targets)
    logits, flat = model(idx[:, :-1]).flatten(0, 1), targets.flatten()
    kept = flat != -1  # -log softmax(logits)[target], averaged over the targets that are not ignored
    expected = (logits.logsumexp(-1) - logits.gather(-1, flat.clamp(min=0)[:, None])[:, 0])[kept].mean()
    if model.config.ffn == "moe":  # the balance loss, if any, is part of the total
        expected = expected + model.loss_terms(idx[:, :-1], targets).aux
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=0)
    for got, want in zip(grads(loss), grads(expected)):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.slow
def test_compiled_training_step_equals_eager():
    model = build(ffn="moe")
    idx = torch.randint(0, 128, (2, 17))
    eager = model(idx[:, :-1], idx[:, 1:])
    eager_grad = torch.autograd.grad(eager, model.embed.weight)[0]
    compiled = torch.compile(model)(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(compiled, model.embed.weight)[0], eager_grad, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_with_norm_weights_keeps_the_fused_norm():
    """A float32 norm weight on a bf16 input (MLA's latent) would warn and take the unfused path."""
    model = build(attention="mla", ffn="moe", norm_weights=True, activation="swiglu")
    idx = torch.randint(0, 128, (2, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
    assert torch.isfinite(loss) and model.blocks[0].attn_norm.weight.grad.dtype == torch.float32
