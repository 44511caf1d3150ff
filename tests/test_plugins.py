"""Plugins through real entry points: a temporary *.dist-info on sys.path, no pip inside pytest."""

import json

import pytest
import torch

from nanods import NanoDeepSeek, checkpoint, registry
from nanods.errors import NanodsError
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


def test_checkpoints_record_provenance_and_name_a_missing_package(install, tmp_path, monkeypatch):
    install("fake-router", {"plain": "MODULE:PlainRouter"})
    model = NanoDeepSeek(tiny_config("router", "plain"))
    path = checkpoint.save(tmp_path / "run", model, model.config, byte_tokenizer(), 1, {}, {}, {})
    components = json.loads(read_header(path)[1]["nanods.components"])
    assert components["router"] == {"name": "plain", "dist": "fake-router", "version": "0.3"}
    assert components["attention"]["dist"] == "nanods"
    loaded, _ = checkpoint.load(path)
    assert torch.equal(loaded.blocks[0].ffn.router.gate, model.blocks[0].ffn.router.gate)
    (tmp_path / "fake_router-0.3.dist-info" / "entry_points.txt").write_text("")  # "uninstall" it
    registry.components.cache_clear()
    with pytest.raises(NanodsError, match="needs router 'plain' from package 'fake-router'.*pip install --force-reinstall 'fake-router==0.3'"):
        checkpoint.load(path)


def test_a_checkpoint_loads_its_own_package_when_two_offer_the_name(install, tmp_path):
    install("fake-router", {"plain": "MODULE:PlainRouter"})
    model = NanoDeepSeek(tiny_config("router", "plain"))
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


@pytest.mark.parametrize("group,name", [("attention", "mha"), ("attention", "mla"), ("ffn", "dense"), ("ffn", "moe"),
                                        ("router", "sigmoid"), ("router", "softmax")])
def test_builtins_pass_the_conformance_kit(group, name):
    check_component(group, name)
