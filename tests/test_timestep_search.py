"""The evolutionary schedule search (AutoDiffusion-style baseline) on synthetic objectives."""

import pytest

from diffslim.methods.timestep_search import evolutionary_timesteps


def _target_score(target):
    return lambda ts: -sum((a - b) ** 2 for a, b in zip(ts, target)) / 1e4


def test_valid_schedules_budget_and_determinism():
    seen = []

    def f(ts):
        seen.append(ts)
        assert ts[0] == 999 and len(ts) == 5 and all(a > b for a, b in zip(ts, ts[1:])) and ts[-1] >= 0
        return -abs(ts[2] - 500)

    a = evolutionary_timesteps(f, 5, budget=20, seed=3)
    assert a.n_evals == 20 == len(seen) == len({tuple(s) for s in seen})  # each distinct schedule evaluated once
    b = evolutionary_timesteps(f, 5, budget=20, seed=3)
    assert a.best_timesteps == b.best_timesteps and a.best_score == b.best_score
    assert a.best_score == max(s for _, s in a.evaluations)


def test_improves_on_its_first_generation():
    target = [999, 700, 420, 180, 30]
    res = evolutionary_timesteps(_target_score(target), 5, budget=60, population=8, seed=0)
    first = max(s for _, s in res.evaluations[:8])
    assert res.best_score > first


def test_rejects_one_step():
    with pytest.raises(ValueError, match="steps >= 2"):
        evolutionary_timesteps(lambda ts: 0.0, 1)
