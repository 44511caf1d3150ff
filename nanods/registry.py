"""Component registry: attention, FFN and router classes found through Python entry points.

The built-ins are registered in nanods' own pyproject exactly as a plugin registers its own, so
there is one discovery path. Nothing is imported until a config selects it.
"""

from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from nanods.checks import check_fields
from nanods.errors import NanodsError, did_you_mean

if TYPE_CHECKING:
    from nanods.config import NanoDeepSeekConfig

GROUPS = {"attention": "nanods.attention", "ffn": "nanods.ffn", "router": "nanods.router"}


@dataclass(frozen=True)
class Component:
    """One registered component: where it comes from, without importing it."""

    group: str
    name: str
    dist: str
    version: str
    target: str  # "module:attr"
    entry_point: md.EntryPoint

    def load(self) -> type:
        """Import the class, turning any failure into an error that names the plugin and its package."""
        try:
            return self.entry_point.load()
        except Exception as e:  # a plugin can fail in any way; say who failed
            raise NanodsError(f"{self.group} '{self.name}' from package '{self.dist}' failed to import "
                              f"({self.target}): {type(e).__name__}: {e}") from None


def _require_installed() -> None:
    try:
        md.distribution("nanods")
    except md.PackageNotFoundError:
        raise NanodsError("nanods is not installed, so its components are not registered: "
                          "run `pip install -e .` in the nanods checkout") from None


@lru_cache(maxsize=None)
def components(group: str) -> tuple[Component, ...]:
    """Every component registered in a group (a name offered twice appears twice)."""
    _require_installed()
    found = []
    for ep in md.entry_points(group=GROUPS[group]):
        dist = getattr(ep, "dist", None)
        found.append(Component(group, ep.name, dist.metadata["Name"] if dist else "?",
                               dist.version if dist else "?", ep.value, ep))
    return tuple(sorted(found, key=lambda c: (c.name, c.dist)))


def find(group: str, name: str) -> Component:
    """The component called `name` (or `dist:name`) in `group`, or an error listing the valid names."""
    if group not in GROUPS:
        raise NanodsError(f"unknown component group '{group}'{did_you_mean(group, GROUPS)}")
    dist, _, short = name.rpartition(":")
    matches = [c for c in components(group) if c.name == short and (not dist or c.dist == dist)]
    if not matches:
        names = sorted({c.name for c in components(group)})
        raise NanodsError(f"unknown {group} '{name}'{did_you_mean(short, names)}; "
                          f"registered: {', '.join(names) or 'none'} (see `nanods components`)")
    if len(matches) > 1:
        offered = " and ".join(f"'{c.dist}'" for c in matches)
        choices = " or ".join(f"'{c.dist}:{short}'" for c in matches)
        raise NanodsError(f"{group} '{short}' is offered by both {offered}; pick one with {choices}")
    return matches[0]


def get(group: str, name: str) -> type:
    return find(group, name).load()


def build(group: str, name: str, config: NanoDeepSeekConfig, layer_idx: int) -> Any:
    """Construct a component as the contract says: cls(config, layer_idx)."""
    component = find(group, name)
    cls = component.load()
    if name == getattr(config, group):  # its own options table, checked before the plugin sees it
        options(cls, getattr(config, f"{group}_options"), f"[model.{group}_options]")
    try:
        return cls(config, layer_idx)
    except NanodsError:
        raise
    except Exception as e:
        raise NanodsError(f"{group} '{name}' from package '{component.dist}' failed to construct: "
                          f"{type(e).__name__}: {e}") from None


def options(cls: type, values: dict[str, Any], where: str) -> Any:
    """A component's own options: its `Config` dataclass filled from `values` (unknown keys refused)."""
    schema = getattr(cls, "Config", None)
    if schema is None:
        if values:
            raise NanodsError(f"{where} has options {sorted(values)} but {cls.__name__} declares none "
                              "(is the intended component selected?)")
        return None
    return schema(**check_fields(values, where, schema))


def check_options(config: NanoDeepSeekConfig) -> None:
    """Validate [model.*_options] against the selected components (imports only those)."""
    for group, name in selected(config).items():
        options(get(group, name), getattr(config, f"{group}_options"), f"[model.{group}_options]")
    unused = [g for g in GROUPS if g not in selected(config) and getattr(config, f"{g}_options")]
    if unused:
        raise NanodsError(f"[model.{unused[0]}_options] is set but this model uses no {unused[0]}")


def selected(config: NanoDeepSeekConfig) -> dict[str, str]:
    """The component name per group that a config uses (no router without MoE)."""
    groups = {"attention": config.attention, "ffn": config.ffn}
    if config.use_moe:
        groups["router"] = config.router
    return groups


def describe(config: NanoDeepSeekConfig) -> dict[str, dict[str, str]]:
    """Provenance of the components a config selects: name, distribution and version."""
    out = {}
    for group, name in selected(config).items():
        c = find(group, name)
        out[group] = {"name": c.name, "dist": c.dist, "version": c.version}
    return out


def as_rows(check_import: bool = False) -> list[dict[str, Any]]:
    """Rows for `nanods components`; imports each component only when asked."""
    rows = []
    for group in GROUPS:
        for c in components(group):
            row = {"group": group, "name": c.name, "package": c.dist, "version": c.version, "target": c.target}
            if check_import:
                try:
                    c.load()
                    row["imports"] = True
                except NanodsError as e:
                    row["imports"] = False
                    row["error"] = str(e)
            rows.append(row)
    return rows


