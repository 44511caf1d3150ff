"""A time budget holds on a machine whose speed changes, and its learning rate still decays to zero."""

import pytest

from nanods.project import resolve_project
from nanods.train import budget as budget_module
from nanods.train.budget import TimeBudget
from nanods.train.schedule import lr_factor


def simulate(monkeypatch, seconds_per_step, budget=100.0, eval_every=10, eval_seconds=0.3):
    """Run the trainer's planning loop against a fake clock: (wall seconds, steps, lr factor of each step)."""
    clock = [0.0]
    monkeypatch.setattr(budget_module.time, "perf_counter", lambda: clock[0])
    plan = TimeBudget(budget, max_total=100_000, decay_frac=0.2, eval_every=eval_every)
    step, total, lrs = 0, 100_000, []
    while step < total:
        lrs.append(lr_factor(step, total, 5, 0.2, plan.decay_start))  # what train_step uses, before the step
        dt = seconds_per_step(clock[0])
        clock[0] += dt
        step += 1
        total = plan.plan(step, total, dt, first=step == 1)
        plan.settle(step, total)
        if step % eval_every == 0 or step == total:
            clock[0] += eval_seconds
            plan.eval_took(eval_seconds)
    return clock[0], step, lrs


@pytest.mark.parametrize("name,speed", [
    ("steady", lambda t: 0.5),
    ("3x slower from 40 s on", lambda t: 0.5 if t < 40 else 1.5),
    ("3x slower in the decay", lambda t: 0.5 if t < 85 else 1.5),
    ("2x faster from 30 s on", lambda t: 1.0 if t < 30 else 0.5),
    ("20x slower from 50 s on", lambda t: 0.5 if t < 50 else 10.0),  # a busy machine, measured: 0.45 s -> 22 s
])
def test_the_budget_holds_and_the_lr_decays_to_zero(monkeypatch, name, speed):
    wall, steps, lrs = simulate(monkeypatch, speed)
    assert 0.9 * 100 <= wall <= 1.05 * 100 + 0.3, (name, wall)  # + the final eval
    tail = lrs[5:]  # past warm-up
    assert tail == sorted(tail, reverse=True), name  # flat, then a decay that never restarts
    assert max(a - b for a, b in zip(tail, tail[1:])) <= 0.5, (name, tail[-5:])  # never a jump into its tail
    assert tail[-1] <= 0.34 and sum(lr < 1 for lr in tail) >= 2, (name, tail[-5:])  # the last steps decayed


def test_a_slow_first_step_does_not_cut_the_run(monkeypatch):
    """A slow warm-up step (compilation, first allocations) must not make the plan short enough to start
    the decay early: the decay only shrinks a plan, so the run would end far inside its budget."""
    wall, steps, _ = simulate(monkeypatch, lambda t: 30.0 if t == 0 else 0.5)
    assert 90 <= wall <= 105.3 and steps >= 120


def test_a_step_count_replaces_the_presets_budget_but_not_an_explicit_one():
    assert resolve_project({}, scale="small").train.time_budget == "8m"
    assert resolve_project({}, scale="small", sets=["train.steps=3000"]).train.time_budget is None
    both = resolve_project({"train": {"time_budget": "2m"}}, scale="small", sets=["train.steps=3000"]).train
    assert (both.steps, both.time_budget) == (3000, "2m")


def test_a_machine_that_suddenly_crawls_ends_the_run_after_one_slow_step(monkeypatch):
    """No plan can cut a step short: what a budget can do is not start another slow one it cannot afford."""
    wall, steps, _ = simulate(monkeypatch, lambda t: 0.5 if t < 90 else 20.0)
    assert wall <= 90 + 20.0 + 0.3 + 0.3  # the slow step that was already running, its eval, and one before
    steady_wall, steady_steps, _ = simulate(monkeypatch, lambda t: 0.5)
    assert steps < steady_steps


def test_ranks_that_agree_on_the_total_agree_on_the_decay(monkeypatch):
    """Rank 0 also saves and plots, so its evals take longer and its own plan is shorter: the decay must start
    from the total all ranks agreed on (their smallest), or their learning rates would differ."""
    clock = [0.0]
    monkeypatch.setattr(budget_module.time, "perf_counter", lambda: clock[0])
    ranks = [TimeBudget(100.0, 100_000, 0.2, 10) for _ in range(2)]
    step, total = 0, 100_000
    while step < total:
        clock[0] += 0.5
        step += 1
        for rank, cost in zip(ranks, (0.3, 0.05)):
            if step % 10 == 0:
                rank.eval_took(cost)
        total = min(rank.plan(step, total, 0.5, first=step == 1) for rank in ranks)
        for rank in ranks:
            rank.settle(step, total)
        assert ranks[0].decay_start == ranks[1].decay_start, step
    assert ranks[0].decay_start is not None
