"""Muon: batched Newton-Schulz orthogonalisation, the parameter split, and training with it."""

import torch
from conftest import build

from nanods.project import TrainSettings
from nanods.train.muon import Muon, newton_schulz
from nanods.train.optim import build_optimizers, split_parameters


def test_newton_schulz_pushes_singular_values_towards_one():
    torch.manual_seed(0)
    for shape in [(32, 64), (64, 32), (3, 48, 20)]:
        g = torch.randn(*shape) * torch.logspace(-1, 1, shape[-1])  # condition numbers of 40-170
        s = torch.linalg.svdvals(newton_schulz(g))
        assert s.min() > 0.5 and s.max() < 1.3, (shape, s.min(), s.max())
        u, _, vh = torch.linalg.svd(g, full_matrices=False)  # and it keeps the singular vectors
        cos = torch.nn.functional.cosine_similarity((u @ vh).flatten(-2), newton_schulz(g).flatten(-2), dim=-1)
        assert (cos > 0.9).all()


def test_batched_equals_slice_by_slice():
    g = torch.randn(4, 16, 24)
    torch.testing.assert_close(newton_schulz(g), torch.stack([newton_schulz(x) for x in g]), rtol=1e-5, atol=1e-6)


def test_muon_steps_stacked_expert_weights():
    w = torch.nn.Parameter(torch.randn(4, 8, 12))
    opt = Muon([w], lr=0.1)
    w.grad = torch.randn_like(w)
    before = w.detach().clone()
    opt.step()
    delta = (w.detach() - before) / (-0.1 * 0.2 * 12 ** 0.5)
    for e in range(4):  # each expert's update is (nearly) orthogonal on its own
        s = torch.linalg.svdvals(delta[e])
        assert s.min() > 0.5 and s.max() < 1.3


def test_parameter_split_keeps_embeddings_head_gates_and_norms_on_adamw():
    model = build(ffn="moe", norm_weights=True)
    muon, decay, no_decay = split_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in muon) and any(p.dim() == 3 for p in muon)
    assert {names[id(p)] for p in decay} == {"lm_head.weight"} | {f"blocks.{i}.ffn.router.weight" for i in range(2)}
    assert "embed.weight" in {names[id(p)] for p in no_decay} and all(p.dim() == 1 for p in no_decay if p is not model.embed.weight)
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in muon + decay + no_decay) == total


def test_training_with_muon_lowers_the_loss():
    model = build(ffn="moe")
    optimizers = build_optimizers(model, TrainSettings(optimizer="muon", lr=3e-3), torch.device("cpu"))
    assert [type(o).__name__ for o in optimizers] == ["AdamW", "Muon"]
    idx = torch.randint(0, 128, (4, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        for o in optimizers:
            o.step()
            o.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
