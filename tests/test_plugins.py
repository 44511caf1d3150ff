"""Plugins through real entry points: a temporary *.dist-info on sys.path, no pip inside pytest."""

import json

import pytest
import torch

from nanods import NanoDeepSeek, checkpoint, registry
from nanods.errors import NanodsError
from nanods.layers.ffn.moe import update_expert_bias
from nanods.safetensors_header import read_header
from nanods.testing import check_component, tiny_config
from nanods.tokenizer import byte_tokenizer

ROUTER = '''
import torch
import torch.nn.functional as F
from torch import nn


class PlainRouter(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.k = config.top_k
        self.gate = nn.Parameter(torch.randn(config.num_experts, config.n_embd) * 0.02)

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            probs = torch.softmax(F.linear(x.float(), self.gate.float()), dim=-1)
            top = probs.topk(self.k, dim=-1)
            return top.values / top.values.sum(-1, keepdim=True), top.indices


class WrongShapeRouter(PlainRouter):
    def forward(self, x):
        weights, indices = super().forward(x)
        return weights[..., :1], indices


class ObviousRouter(nn.Module):
    """Written the obvious way: no autocast handling of its own; records how the host calls it."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.k = config.top_k
        self.gate = nn.Linear(config.n_embd, config.num_experts, bias=False)
        self.calls = []

    def forward(self, x):
        self.calls.append((x.dtype, torch.is_autocast_enabled(x.device.type)))
        logits = self.gate(x.float())
        probs = logits.softmax(-1)
        w, i = probs.topk(self.k)
        return w, i


class Bf16WeightsRouter(ObviousRouter):
    def forward(self, x):
        w, i = super().forward(x)
        return w.bfloat16(), i


class OutOfRangeRouter(ObviousRouter):
    def forward(self, x):
        w, i = super().forward(x)
        return w, i + 1


class RepeatingRouter(ObviousRouter):
    def forward(self, x):
        w, i = super().forward(x)
        return w, i[..., :1].expand_as(i).contiguous()
'''

ATTENTION = '''
import torch

from nanods.layers.attention.mha import MultiHeadAttention


class Bf16BrokenAttention(MultiHeadAttention):
    """Fine in float32, overflows under bf16 autocast (as a careless scale in bf16 would)."""

    def forward(self, x, pos, cache=None):
        y = super().forward(x, pos, cache)
        return y * float("inf") if torch.is_autocast_enabled(x.device.type) else y
'''


@pytest.fixture
def install(tmp_path, monkeypatch):
    """install(dist, {name: "module:Class"}, group, code) makes an installed-looking distribution."""
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.components.cache_clear()

    def make(dist: str, entries: dict[str, str], group: str = "nanods.router", code: str = ROUTER) -> None:
        module = dist.replace("-", "_")
        (tmp_path / f"{module}.py").write_text(code)
        info = tmp_path / f"{module}-0.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3\n")
        lines = "\n".join(f"{name} = {target.replace('MODULE', module)}" for name, target in entries.items())
        (info / "entry_points.txt").write_text(f"[{group}]\n{lines}\n")
        registry.components.cache_clear()

    yield make
    registry.components.cache_clear()


def test_a_plugin_router_is_listed_built_and_conforms(install):
    install("fake-router", {"plain": "MODULE:PlainRouter"})
    rows = [r for r in registry.as_rows() if r["name"] == "plain"]
    assert rows == [{"group": "router", "name": "plain", "package": "fake-router", "version": "0.3",
                     "target": "fake_router:PlainRouter"}]
    check_component("router", "plain")


def test_a_name_offered_twice_names_both_packages(install):
    install("other-dist", {"sigmoid": "MODULE:PlainRouter"})
    with pytest.raises(NanodsError, match="'nanods' and 'other-dist'.*'nanods:sigmoid' or 'other-dist:sigmoid'"):
        registry.find("router", "sigmoid")
    assert registry.find("router", "other-dist:sigmoid").dist == "other-dist"
    model = NanoDeepSeek(tiny_config("router", "other-dist:sigmoid"))
    assert type(model.blocks[0].ffn.router).__name__ == "PlainRouter"


def test_a_plugin_that_fails_to_import_is_named(install):
    install("broken-plugin", {"broken": "MODULE:Router"}, code="raise ImportError('needs libfoo')\n")
    with pytest.raises(NanodsError, match="router 'broken' from package 'broken-plugin' failed to import.*libfoo"):
        NanoDeepSeek(tiny_config("router", "broken"))
    assert any(r["name"] == "broken" and not r["imports"] for r in registry.as_rows(check_import=True))


def test_a_plugin_that_breaks_the_contract_is_named(install):
    install("sloppy-router", {"sloppy": "MODULE:WrongShapeRouter"})
    model = NanoDeepSeek(tiny_config("router", "sloppy"))
    with pytest.raises(NanodsError, match="router 'sloppy' from package 'sloppy-router' broke the contract: weights"):
        model(torch.zeros(1, 4, dtype=torch.long))


BYTES = 320  # the byte tokenizer's 257 ids, padded to a multiple of 64: what a checkpoint's tokenizer must fit


def test_checkpoints_record_provenance_and_name_a_missing_package(install, tmp_path, monkeypatch):
    install("fake-router", {"plain": "MODULE:PlainRouter"})
    model = NanoDeepSeek(tiny_config("router", "plain", vocab_size=BYTES))
    path = checkpoint.save(tmp_path / "run", model, model.config, byte_tokenizer(), 1, {}, {}, {})
    components = json.loads(read_header(path)[1]["nanods.components"])
    assert components["router"] == {"name": "plain", "dist": "fake-router", "version": "0.3"}
    assert components["attention"]["dist"] == "nanods"
    loaded, _ = checkpoint.load(path)
    assert torch.equal(loaded.blocks[0].ffn.router.gate, model.blocks[0].ffn.router.gate)
    (tmp_path / "fake_router-0.3.dist-info" / "entry_points.txt").write_text("")  # "uninstall" it
    registry.components.cache_clear()
    with pytest.raises(NanodsError, match="needs router 'plain' from fake-router 0.3, which is installed here but offers no such component.*pip install --force-reinstall 'fake-router==0.3'"):
        checkpoint.load(path)


def test_a_checkpoint_loads_its_own_package_when_two_offer_the_name(install, tmp_path):
    install("fake-router", {"plain": "MODULE:PlainRouter"})
    model = NanoDeepSeek(tiny_config("router", "plain", vocab_size=BYTES))
    path = checkpoint.save(tmp_path / "run", model, model.config, byte_tokenizer(), 1, {}, {}, {})
    install("rival-router", {"plain": "MODULE:WrongShapeRouter"})
    with pytest.raises(NanodsError, match="offered by both"):
        registry.find("router", "plain")
    loaded, _ = checkpoint.load(path)
    assert loaded.config.router == "fake-router:plain"
    loaded(torch.zeros(1, 4, dtype=torch.long))  # the rival's broken router would raise here


def test_unknown_component_suggests_the_closest(install):
    install("fake-router", {"plain": "MODULE:PlainRouter"})
    with pytest.raises(NanodsError, match="unknown router 'plian' \\(did you mean 'plain'\\?\\)"):
        registry.find("router", "plian")


def test_an_obvious_router_trains_under_bf16_autocast(install):
    """The host calls routers in float32 with autocast off: a plugin that does not is still right."""
    install("obvious-router", {"obvious": "MODULE:ObviousRouter"})
    torch.manual_seed(0)
    model = NanoDeepSeek(tiny_config("router", "obvious")).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, 128, (2, 9))
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        update_expert_bias(model)
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss)
    router = model.blocks[0].ffn.router
    assert set(router.calls) == {(torch.float32, False)}
    gate = router.gate.weight.detach().clone()
    model.eval().to(torch.bfloat16)  # as `nanods bench` decodes: the router keeps its float32 gate, exactly
    assert torch.equal(router.gate.weight, gate)
    assert model.generate(idx[:, :3], 3, temperature=0).shape == (2, 6)


@pytest.mark.parametrize("router,problem", [
    ("Bf16WeightsRouter", "weights must be torch.float32 (2, 10, 2), got torch.bfloat16 (2, 10, 2)"),
    ("OutOfRangeRouter", "indices must be in [0, 4), got"),
    ("RepeatingRouter", "a token chose the same expert twice")])
def test_the_kit_names_a_router_that_breaks_the_contract(install, router, problem):
    install("sloppy-router", {"sloppy": f"MODULE:{router}"})
    with pytest.raises(NanodsError) as info:
        check_component("router", "sloppy")
    message = str(info.value)
    assert message.startswith(f"router 'sloppy' from package 'sloppy-router' broke the contract: {problem}")
    assert "\n" not in message


def test_the_kit_checks_attention_under_bf16_autocast(install):
    install("bf16-broken", {"fragile": "MODULE:Bf16BrokenAttention"}, group="nanods.attention", code=ATTENTION)
    with pytest.raises(AssertionError, match="attention 'fragile' from package 'bf16-broken': the training loss "
                                             "under bf16 autocast is nan"):
        check_component("attention", "fragile")


@pytest.mark.parametrize("group,name", [("attention", "mha"), ("attention", "mla"), ("ffn", "dense"), ("ffn", "moe"),
                                        ("router", "sigmoid"), ("router", "softmax")])
def test_builtins_pass_the_conformance_kit(group, name):
    """In float32 and under bf16 autocast."""
    check_component(group, name)
