"""`benchmarks.detect_weights`: the removal model against brute force on a synthetic generator."""

import numpy as np
import pytest

from benchmarks.detect_weights import effective_draws, exclusion_weights


def test_effective_draws_solves_the_expected_count():
    frequencies = np.array([0.5, 0.3, 0.1, 0.05, 0.05])
    for removed in (1, 2, 3):
        m = effective_draws(frequencies, removed)
        assert (1 - (1 - frequencies) ** m).sum() == pytest.approx(removed, abs=1e-6)
    assert effective_draws(frequencies, 0) == 0.0 and effective_draws(frequencies, 5) == float("inf")


SPACE = 400


def _generator(task, count, seed):
    """A task whose question i comes up with probability ∝ (i + 1)^-0.7 (a few frequent, many rare)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, SPACE + 1) ** 0.7
    return [{"question": f"{task}-{i}", "task": task} for i in rng.choice(SPACE, size=count, p=p / p.sum())]


def _first_unique(task, n, seed, seen):
    chosen = []
    for q in _generator(task, 20 * n, seed):
        if q["question"] not in seen and len(chosen) < n:
            seen.add(q["question"])
            chosen.append(q)
    return chosen


def test_weights_undo_the_removal_of_frequent_questions():
    """Over many draws, each group of questions' weighted count in the filtered set matches its count in an
    unfiltered draw of the same procedure; unweighted, the frequent questions (removed most often) are too few."""
    unfiltered, plain, weighted = np.zeros(SPACE), np.zeros(SPACE), np.zeros(SPACE)
    for trial in range(300):
        seen = set()
        removed = {q["question"] for q in _first_unique("a", 20, 1000 + trial, seen)}  # "the evaluated set"
        kept = _first_unique("a", 20, 5000 + trial, seen)
        weights, record = exclusion_weights(kept, removed, {"a": 1.0}, _generator, stream=20_000)
        assert weights.mean() == pytest.approx(1.0) and record["a"]["kept"] == 20
        for q, w in zip(kept, weights):
            plain[int(q["question"][2:])] += 1
            weighted[int(q["question"][2:])] += w
        for q in _first_unique("a", 20, 9000 + trial, set()):
            unfiltered[int(q["question"][2:])] += 1
    for group in (slice(0, 5), slice(5, 20), slice(20, SPACE)):
        assert weighted[group].sum() == pytest.approx(unfiltered[group].sum(), rel=0.1), group
    assert plain[:5].sum() < 0.7 * unfiltered[:5].sum()  # the bias the weights exist for


def test_task_shares_set_each_tasks_total_weight():
    kept = [{"question": f"a-{i}", "task": "a"} for i in range(30, 33)] + [{"question": "b-35", "task": "b"}]
    weights, _ = exclusion_weights(kept, set(), {"a": 0.5, "b": 0.5}, _generator, stream=2000)
    assert weights[:3].sum() == pytest.approx(2.0) and weights[3] == pytest.approx(2.0)
    weights, _ = exclusion_weights(kept, set(), {"a": 1.0}, _generator, stream=2000)  # b is not evaluated
    assert weights[3] == 0.0 and weights.sum() == pytest.approx(4.0)
