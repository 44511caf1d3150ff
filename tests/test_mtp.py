"""Multi-token prediction: the modules, their loss, and self-speculative decoding with them."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import build, tiny_config
from nanods.errors import NanodsError
from nanods.flops import count_parameters, flops_per_token
from nanods.generate import stream
from nanods.memory import model_size
from nanods.model import NanoDeepSeek
from nanods.speculative import SelfSpeculation, SpeculationStats

VOCAB = 64


def _cyclic_batch(generator: torch.Generator, cycle: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    """Windows of a repeating cycle of tokens with half of them replaced at random: predictable, not certain."""
    starts = torch.randint(0, len(cycle), (rows, 1), generator=generator)
    x = cycle[(starts + torch.arange(length)) % len(cycle)]
    noise = torch.rand(x.shape, generator=generator) < 0.5
    return torch.where(noise, torch.randint(0, VOCAB, x.shape, generator=generator), x)


@pytest.fixture(scope="module", params=[1, 2])
def trained(request):
    return _trained(request.param)


SPARSE = dict(attention="dsa", q_lora_rank=16, index_topk=4)  # DSA reading 4 of up to 40 positions


@functools.cache
def _trained(depth: int, sparse: bool = False):
    """A float64 tiny model with MTP trained on a noisy cycle, so its drafts pass often but not always."""
    torch.manual_seed(0)
    model = NanoDeepSeek(tiny_config(vocab_size=VOCAB, mtp_depth=depth, **(SPARSE if sparse else {}))).double()
    g = torch.Generator().manual_seed(0)
    cycle = torch.randint(0, VOCAB, (11,), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        batch = _cyclic_batch(g, cycle, 8, 33)
        model(batch[:, :-1], batch[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), cycle


def _prompts(cycle: torch.Tensor) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    on_cycle = [cycle[torch.arange(s, s + 6) % len(cycle)][None] for s in (0, 3, 7)]
    off_cycle = [torch.randint(0, VOCAB, (1, n), generator=g) for n in (1, 4, 9)]
    return on_cycle + off_cycle


# ---- the modules and their loss ------------------------------------------------------------------
@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_loss_is_the_paper_formula(float64, depth):
    """Depth k: block(eh_proj([enorm(emb(x_{t+k})); hnorm(h_{k-1}(t))])) predicts x_{t+k+1}; written out by hand."""
    model = build(mtp_depth=depth, norm_weights=True, mtp_loss_weight=0.25).train()
    for p in model.parameters():  # learnable norms away from 1, so swapping enorm and hnorm shows
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    x = torch.randint(0, 128, (2, 12))
    y = torch.randint(0, 128, (2, 12))
    terms = model(x, y, return_terms=True)
    assert terms.mtp.shape == (depth,)
    h, _ = model.hidden(x)
    pos = torch.arange(12).expand(2, 12)
    expected = []
    for k, m in enumerate(model.mtp, start=1):
        inp = m.eh_proj(torch.cat([m.enorm(model.embed(x[:, k:])), m.hnorm(h[:, :-1])], dim=-1))
        h, _ = m.block(inp, pos[:, :12 - k])
        logits = model.lm_head(m.norm(h))
        expected.append(F.cross_entropy(logits.flatten(0, 1), y[:, k:].flatten()))
    torch.testing.assert_close(terms.mtp, torch.stack(expected))
    torch.testing.assert_close(terms.total, terms.ce + terms.aux + 0.25 * torch.stack(expected).mean())


def test_mtp_ignores_masked_targets_and_eval_mode_has_no_mtp_term(float64):
    model = build(mtp_depth=1).train()
    x, y = torch.randint(0, 128, (2, 10)), torch.randint(0, 128, (2, 10))
    masked = y.clone()
    masked[:, 5] = -1
    a = model(x, y, return_terms=True).mtp
    b = model(x, masked, return_terms=True).mtp
    assert not torch.allclose(a, b)
    h, _ = model.hidden(x)
    m = model.mtp[0]
    h1, _ = m(h[:, :-1], model.embed(x[:, 1:]), torch.arange(9).expand(2, 9))
    keep = masked[:, 1:] != -1
    expected = F.cross_entropy(model.lm_head(m.norm(h1))[keep], masked[:, 1:][keep])
    torch.testing.assert_close(b[0], expected)
    model.eval()
    terms = model(x, y, return_terms=True)
    assert terms.mtp.numel() == 0 and torch.equal(terms.total, terms.ce + terms.aux)


def test_mtp_gradients_reach_the_trunk_and_the_shared_embedding():
    model = build(mtp_depth=2, ffn="moe").train()
    x = torch.randint(0, 128, (2, 16))
    model(x, x.roll(-1, 1), return_terms=True).mtp.sum().backward()  # the MTP losses alone
    for name, p in model.named_parameters():
        if name.startswith(("blocks.", "embed.", "mtp.")) and "router" not in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.norm.weight is None or model.norm.weight.grad is None  # the main head's norm is not on their path


def test_mtp_of_a_later_token_never_reaches_an_earlier_prediction(float64):
    model = build(mtp_depth=2).train()
    x = torch.randint(0, 128, (1, 12))
    y = x.clone()
    y[0, 8] = (y[0, 8] + 1) % 128
    ha, _ = model.hidden(x)
    hb, _ = model.hidden(y)
    pos = torch.arange(12)[None]
    for k, m in enumerate(model.mtp, start=1):
        ha, _ = m(ha[:, :-1], model.embed(x[:, k:]), pos[:, :12 - k])
        hb, _ = m(hb[:, :-1], model.embed(y[:, k:]), pos[:, :12 - k])
        # depth k at position t reads tokens up to t + k: positions before 8 - k are untouched (to float64
        # rounding: the changed token routes to other experts, so expert blocks have other sizes)
        torch.testing.assert_close(ha[:, :8 - k], hb[:, :8 - k], rtol=0, atol=1e-12)
        assert (ha[:, 8 - k] - hb[:, 8 - k]).abs().max() > 1e-3


def test_mtp_depth_beyond_the_sequence_is_refused():
    with pytest.raises(NanodsError, match=r"mtp_depth \(64\) must be < sequence_len \(64\)"):
        tiny_config(mtp_depth=64)
    model = build(mtp_depth=3).train()
    with pytest.raises(ValueError, match="longer than 3 tokens"):
        model(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


def test_parameter_counts_put_mtp_apart_and_training_flops_include_it():
    plain, mtp = build(), build(mtp_depth=2)
    a, b = count_parameters(plain), count_parameters(mtp)
    extra = sum(p.numel() for p in mtp.mtp.parameters())
    assert b["groups"]["mtp"] == {"total": extra, "active": 0}
    assert b["total"] == a["total"] + extra and b["active"] == a["active"]
    assert model_size(mtp.config).parameters == b["total"]
    assert flops_per_token(mtp, 64) == flops_per_token(plain, 64)  # inference runs without MTP
    module = mtp.mtp[0]
    routed = module.block.ffn.experts
    unused = (1 - mtp.config.top_k / mtp.config.num_experts) * sum(p.numel() for p in routed.parameters())
    matmul = sum(p.numel() for p in module.parameters() if p.dim() >= 2) - unused + mtp.lm_head.weight.numel()
    attention = type(module.block.attn).attention_flops_per_token(mtp.config, 64, False)
    assert flops_per_token(mtp, 64, mtp=True) == flops_per_token(plain, 64) + 2 * (2 * int(matmul) + attention)


# ---- self-speculative decoding -----------------------------------------------------------------
def _plain(model, idx, n, **kw):
    return torch.stack(list(stream(model, idx, n, **kw)), dim=1)


def _speculative(model, idx, n, **kw):
    stats = SpeculationStats()
    return torch.stack(list(stream(model, idx, n, speculative=True, stats=stats, **kw)), dim=1), stats


def test_speculative_greedy_is_plain_greedy_token_for_token(trained):
    model, cycle = trained
    total = SpeculationStats(drafted=[0] * len(model.mtp), accepted=[0] * len(model.mtp))
    for prompt in _prompts(cycle):
        n = 40 - prompt.size(1)
        got, stats = _speculative(model, prompt, n, temperature=0)
        assert torch.equal(got, _plain(model, prompt, n, temperature=0))
        total.drafted = [a + b for a, b in zip(total.drafted, stats.drafted)]
        total.accepted = [a + b for a, b in zip(total.accepted, stats.accepted)]
        assert stats.rounds < n  # drafts saved main-model steps
    # both outcomes happened at every depth: accepted drafts and rejected ones
    assert all(0 < a < d for a, d in zip(total.accepted, total.drafted)), total


def test_speculative_greedy_with_sparse_attention_is_plain_greedy():
    """DSA in the trunk and in the MTP blocks: the indexer keys roll back with the latent rows."""
    model, cycle = _trained(2, sparse=True)
    accepted = 0
    for prompt in _prompts(cycle):
        got, stats = _speculative(model, prompt, 40 - prompt.size(1), temperature=0)
        assert torch.equal(got, _plain(model, prompt, 40 - prompt.size(1), temperature=0))
        accepted += sum(stats.accepted)
    assert 0 < accepted


def test_speculative_greedy_batch_and_eos_equal_plain(trained):
    model, cycle = trained
    prompts = torch.cat([p[:, :1] for p in _prompts(cycle)])  # six rows, one token each
    eos = int(cycle[5])
    got, _ = _speculative(model, prompts, 30, temperature=0, eos_id=eos)
    assert torch.equal(got, _plain(model, prompts, 30, temperature=0, eos_id=eos))
    assert (got == eos).any()


def test_speculative_on_a_random_model_still_equals_plain(float64):
    model = build(mtp_depth=3, ffn="moe")
    idx = torch.randint(0, 128, (2, 5))
    got, stats = _speculative(model, idx, 30, temperature=0)
    assert torch.equal(got, _plain(model, idx, 30, temperature=0))
    assert stats.rounds == 29 and stats.accepted[0] == 0  # nothing learned, nothing accepted: one token a round
    one = idx[:1, :1]  # a prompt shorter than the depth: the deeper caches start empty
    for temperature in (0, 1.0):
        got, _ = _speculative(model, one, 12, temperature=temperature, seed=0)
        assert got.shape == (1, 12)
    assert torch.equal(_speculative(model, one, 12, temperature=0)[0], _plain(model, one, 12, temperature=0))
    assert torch.equal(model.generate(idx, 0, speculative=True), idx)  # nothing asked, nothing run


def test_caches_after_rejections_equal_caches_built_without_speculation(trained):
    model, cycle = trained
    max_len, drafted, accepted = 60, 0, 0
    for prompt in _prompts(cycle):
        stats = SpeculationStats()
        with torch.no_grad():
            spec = SelfSpeculation(model, 1, max_len, 0.0, None, None, torch.Generator(), VOCAB, stats)
            token = spec.start(prompt).argmax(-1)
            for _ in range(12):
                token = spec.round(token, torch.zeros(1, dtype=torch.bool))[-1]
            drafted, accepted = drafted + sum(stats.drafted), accepted + sum(stats.accepted)
            n = spec.n  # the main cache holds positions 0..n-1
            fresh = model.init_cache(1, max_len)
            h, _ = model.hidden(spec.tokens[:, :n], fresh)
            for kept, built in zip(spec.cache, fresh):
                assert kept.length == built.length == n
                torch.testing.assert_close(kept.buffers["latent"][:, :n], built.buffers["latent"][:, :n])
            pos = torch.arange(n)[None]
            for k, (module, kept) in enumerate(zip(model.mtp, spec.mtp_caches), start=1):
                c = spec.cached[k - 1]
                # every position whose token is the text's, or the round's last few (caught up in the next round)
                assert c == kept.length and n - len(model.mtp) - 1 <= c <= n - k
                built = module.block.attn.init_cache(1, max_len, None, torch.float64)
                h, _ = module(h[:, :c], model.embed(spec.tokens[:, k:c + k]), pos[:, :c], built)
                torch.testing.assert_close(kept.buffers["latent"][:, :c], built.buffers["latent"][:, :c])
    assert drafted > accepted > 0  # rolled back, and kept drafts too


def _exact_marginals(model, prompt, steps, temperature, top_k):
    """The exact distribution of each of the next `steps` tokens, by enumerating every prefix (a small vocab)."""
    from nanods.sampling import sampling_probs

    prefixes, weights, marginals = prompt, torch.ones(1, dtype=torch.float64), []
    with torch.no_grad():
        for _ in range(steps):
            probs = sampling_probs(model(prefixes)[:, -1], temperature, top_k, None).double()  # (P, V)
            joint = weights[:, None] * probs
            marginals.append(joint.sum(0))
            V = probs.size(1)
            prefixes = torch.cat([prefixes.repeat_interleave(V, 0), torch.arange(V).repeat(len(prefixes))[:, None]], 1)
            weights = joint.flatten()
            keep = weights > 1e-9
            prefixes, weights = prefixes[keep], weights[keep]
    return marginals


def _chi_square_z(counts: torch.Tensor, p: torch.Tensor) -> float:
    """Pearson's chi-square of observed counts against probabilities p, as a z-score (categories expected
    fewer than 5 times pooled into one): about N(0, 1) for honest draws."""
    expected = p * counts.sum()
    rare = expected < 5
    observed = torch.cat([counts[~rare], counts[rare].sum()[None]])
    expected = torch.cat([expected[~rare], expected[rare].sum()[None]])
    keep = expected > 0
    stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    df = int(keep.sum()) - 1
    return float((stat - df) / math.sqrt(2 * df))


@pytest.mark.parametrize("case", ["trained", "random"])
def test_speculative_sampling_draws_from_the_models_distribution(case, trained, float64):
    """The empirical distribution of each of three new tokens matches the exact one (a chi-square test).

    Wrong rules show as z-scores of 5-40 (measured): drawing from p instead of the residual after a
    rejection, accepting with probability p(d) instead of p(d)/q(d), and a batch row that passed its
    draft drawing from the residual anyway. Honest draws stayed under 2.
    """
    if case == "trained":
        model, cycle = trained
        prompt, temperature, top_k = _prompts(cycle)[3], 1.0, None
    else:  # a random model's drafts overlap the main model's choices without matching them
        model = build(mtp_depth=len(trained[0].mtp), vocab_size=VOCAB).eval()
        prompt, temperature, top_k = torch.tensor([[3, 1, 4]]), 0.2, 8
    steps, rows, calls = 3, 50, 80
    exact = _exact_marginals(model, prompt, steps, temperature, top_k)
    counts = torch.zeros(steps, VOCAB, dtype=torch.float64)
    accepted = rejected = 0
    for seed in range(calls):
        got, stats = _speculative(model, prompt.expand(rows, -1), steps, temperature=temperature, top_k=top_k,
                                  seed=seed)
        accepted += sum(stats.accepted)
        rejected += sum(stats.drafted) - sum(stats.accepted)
        counts += F.one_hot(got.T, VOCAB).sum(1).double()
    assert accepted > 100 and rejected > 100, (accepted, rejected)
    for step in range(steps):
        assert _chi_square_z(counts[step], exact[step]) < 4, step


def test_speculative_refuses_a_model_without_mtp():
    with pytest.raises(ValueError, match="mtp_depth = 0"):
        next(stream(build(), torch.zeros(1, 2, dtype=torch.long), 4, speculative=True))


@pytest.mark.slow
def test_compiled_speculative_equals_plain_greedy():
    model, cycle = _trained(1)
    prompt = _prompts(cycle)[1]
    got, stats = _speculative(model, prompt, 24, temperature=0, compile=True)
    assert torch.equal(got, _plain(model, prompt, 24, temperature=0)) and sum(stats.accepted) > 0


# ---- the command line ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mtp_run(tmp_path_factory):
    """A tiny run trained with mtp_depth = 2 (byte tokenizer, a few steps) and one saved without MTP."""
    import json
    import shutil

    from conftest import SOURCE, project
    from nanods import checkpoint
    from nanods.tokenizer import byte_tokenizer
    from nanods.train.loop import RunOptions, train

    root = tmp_path_factory.mktemp("mtp")
    shutil.copytree(SOURCE, root / "corpus", ignore=shutil.ignore_patterns("__pycache__"))
    mp = pytest.MonkeyPatch()
    mp.setenv("NANODS_CACHE", str(root / "cache"))
    try:
        assert train(project(str(root / "corpus"), root / "run", "model.mtp_depth=2", "train.steps=12"),
                     RunOptions()) == 0
    finally:
        mp.undo()
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    plain = build(vocab_size=320, tokenizer_vocab_size=257)
    checkpoint.save(root / "plain", plain, plain.config, byte_tokenizer(), 1, {}, {}, {})
    return root, rows


def test_training_logs_each_depths_loss_apart_from_the_main_loss(mtp_run):
    _, rows = mtp_run
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 12 and all(len(r["mtp"]) == 2 and r["loss"] == r["ce"] + r["aux"] for r in steps)
    assert steps[-1]["mtp"][0] < steps[0]["mtp"][0]  # the MTP modules learn
    assert all("mtp" not in r for r in rows if "val_loss" in r)  # val bits per byte is the main head's


def test_sample_speculative_prints_what_plain_prints(mtp_run, capsys):
    from conftest import main_in_process

    root, _ = mtp_run
    ckpt = str(root / "run" / "ckpt.safetensors")
    args = ["sample", ckpt, "--temperature", "0", "--prompt", "def ", "--max-new-tokens", "40", "--device", "cpu"]
    code, plain, _ = main_in_process(args, capsys)
    assert code == 0
    code, out, err = main_in_process(args + ["--speculative"], capsys)
    assert code == 0 and out == plain
    assert "speculative: drafts accepted depth 1 " in err and "depth 2 " in err and "tokens per main-model step" in err


@pytest.mark.parametrize("extra,message", [
    ([], "has none (mtp_depth = 0); train with --set model.mtp_depth=1"),
    (["--no-cache"], "--speculative verifies drafts on the KV cache"),
])
def test_speculative_refusals_are_one_line(extra, message, mtp_run, capsys):
    from conftest import main_in_process

    root, _ = mtp_run
    target = root / ("plain" if not extra else "run") / "ckpt.safetensors"
    code, out, err = main_in_process(["sample", str(target), "--speculative", *extra], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and message in lines[0] and not out, err


def test_inspect_reports_mtp_parameters_apart(mtp_run, capsys):
    import json

    from conftest import main_in_process

    root, _ = mtp_run
    code, out, _ = main_in_process(["inspect", str(root / "run"), "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["params_mtp"] == info["params_by_component"]["mtp"]["total"] > 0
    assert info["params_by_component"]["mtp"]["active"] == 0  # params_active is the inference figure
    assert info["flops_per_token_train"] > 3 * info["flops_per_token"]  # training runs the MTP modules too


def test_bench_measures_speculative_decoding_of_a_checkpoint(mtp_run, monkeypatch, capsys):
    import json

    from conftest import main_in_process

    root, _ = mtp_run
    monkeypatch.setattr("nanods.bench.run", lambda config, *a, **k: {"depth": config.mtp_depth})
    code, out, err = main_in_process(["bench", "--ckpt", str(root / "run"), "--json", "--repeats", "1",
                                      "--dtype", "float32"], capsys)
    assert code == 0, err
    result = json.loads(out)
    (sp,) = result["speculative"]["rows"]
    assert result["depth"] == 2 and sp["path"] == "eager" and sp["identical"] and len(sp["acceptance"]) == 2
    assert sp["plain"]["median"] > 0 and sp["speculative"]["median"] > 0 and sp["tokens_per_step"] >= 1
    code, out, err = main_in_process(["bench", "--ckpt", str(root / "plain")], capsys)
    assert code == 1 and "no MTP modules" in err
