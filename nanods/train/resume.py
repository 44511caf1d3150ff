"""What `--resume` continues: the saved run, whatever ./nanods.toml says today.

A resumed run takes its model from the checkpoint and every training setting from the state saved
beside it. Only what the command line sets explicitly is applied on top; the trainer then refuses
any of it that would change what a step computes (model, data, tokenizer, batch, seed, optimizer).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from nanods import checkpoint
from nanods.checks import check_fields
from nanods.config import NanoDeepSeekConfig
from nanods.errors import NanodsError
from nanods.project import Project, TrainSettings, starting_model_values, take_choice
from nanods.safetensors_header import read_header
from nanods.train.run_dir import ASIDE


def resumed_project(project: Project, explicit: dict[str, dict[str, Any]], scale: str | None,
                    profile: str | None = None) -> Project:
    """`project` with its model and train settings replaced by the saved run's, plus the explicit
    command-line values. A folder without a saved pair is left to the trainer to report."""
    out = Path(project.train.out)
    if not (out / checkpoint.WEIGHTS).is_file() and (out / ASIDE / checkpoint.WEIGHTS).is_file():
        out = out / ASIDE  # an --overwrite that never saved: the trainer will put this run back first
    weights = out / checkpoint.WEIGHTS
    if not weights.is_file():
        return project
    _, meta = read_header(weights)
    state_file = checkpoint.state_path(out, checkpoint.metadata_step(meta, weights))
    if not state_file.is_file():
        return project
    saved = checkpoint.metadata_json(read_header(state_file)[1], "nanods.train", state_file)
    settings = saved.get("settings") if isinstance(saved, dict) else None
    if not isinstance(settings, dict):
        raise NanodsError(f"'{state_file}' is damaged: its nanods.train metadata lacks the run's settings")
    train = check_fields(settings, f"the settings saved in {state_file}", TrainSettings)
    train.update(explicit.get("train", {}), out=project.train.out)  # where it is resumed
    if explicit.get("train", {}).get("data", "stdlib") != "stdlib":  # compared with the absolute path it saved
        train["data"] = str(Path(train["data"]).expanduser().resolve())
    given = dict(explicit.get("model", {}))
    start = starting_model_values(take_choice(given, "scale", scale), take_choice(given, "profile", profile))
    model = checkpoint.config_from_metadata(meta, weights).to_dict()
    model.update(start, **check_fields(given, "the command line", NanoDeepSeekConfig))
    return dataclasses.replace(project, model=NanoDeepSeekConfig(**model), train=TrainSettings(**train))
