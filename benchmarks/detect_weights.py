"""Importance weights that undo what removing the evaluated questions did to the `detect` set.

The detect set is drawn from the same reasoning-gym generators as `arith`, but every text of an evaluated (or
training) set is removed from it. The generators repeat their easy questions often ("2 * 7" comes up about
once in 120 draws, a four-term sum once in 3000), so exactly those are most likely to be taken already: the
measured detect set was right 14.9% of the time against `arith`'s 36%, and a detector fitted on it predicted
a mean risk of 0.81 where 0.64 of the answers were wrong (ECE 0.17).

`exclusion_weights` models the removal per task: a question of generator frequency p_q is in the removed set
with probability π_q = 1 − (1 − p_q)^m, as if the removed set were m independent draws, with m chosen so that
Σ_q π_q equals the number of removed questions of that task the generator can produce. A kept question then
stands for 1 / (1 − π_q) questions of an unfiltered draw, and each task's weights are scaled to that task's
share of the evaluated set. The frequencies p_q come from a long stream of the generator on its own seed,
so nothing about the evaluated answers enters the weights. Questions the generator can produce only rarely
(or not at all, in the stream) keep weight ≈ 1; a question removed with certainty cannot be stood in for,
which is why the weights are capped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["exclusion_weights", "effective_draws"]

STREAM_SEED = 123_456  # the frequency stream's seed: neither an evaluation (< 1000) nor a training (1000+) seed


def effective_draws(frequencies: np.ndarray, removed: int) -> float:
    """m with Σ_q 1 − (1 − p_q)^m = `removed` (bisection on log m; 0 when nothing was removed)."""
    frequencies = np.asarray(frequencies, dtype=np.float64)
    if removed <= 0:
        return 0.0
    if removed >= len(frequencies):
        return float("inf")
    expected = lambda m: float((1.0 - (1.0 - frequencies) ** m).sum())  # noqa: E731, increasing in m
    low, high = 0.0, 1.0
    while expected(high) < removed:
        low, high = high, 2.0 * high
    for _ in range(100):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if expected(middle) < removed else (low, middle)
    return 0.5 * (low + high)


def exclusion_weights(questions: Sequence[dict], removed: set[str], task_shares: dict[str, float],
                      draw: Callable[[str, int, int], list[dict]], stream: int = 20_000,
                      cap: float = 20.0) -> tuple[np.ndarray, dict]:
    """Weights `(len(questions),)` for fitting on `questions` as if `removed` had not been taken out first.

    Args:
        questions: the kept questions, dicts with "question" and "task".
        removed: every text that was excluded before they were drawn (evaluated and training sets).
        task_shares: each task's share of the evaluated set; the weights of a task sum to its share × N
            (a task absent from `task_shares` gets weight 0).
        draw: `draw(task, count, seed)` → the generator's questions (`trainers.questions.reasoning_gym_questions`).
        stream: length of the frequency stream per task.
        cap: the largest weight 1 / (1 − π_q) a question may get, before the per-task scaling.

    Returns:
        The weights (mean 1) and a record per task: the removed count, m, and the weight range.
    """
    tasks = [q["task"] for q in questions]
    weights, record = np.zeros(len(questions)), {}
    total_share = sum(task_shares.get(task, 0.0) for task in set(tasks))
    for task in sorted(set(tasks)):
        counts = Counter(q["question"] for q in draw(task, stream, STREAM_SEED))
        texts = list(counts)
        frequencies = np.array([counts[t] / stream for t in texts])
        removed_here = sum(text in removed for text in texts)
        draws = effective_draws(frequencies, removed_here)
        frequency = dict(zip(texts, frequencies))
        rows = [i for i, t in enumerate(tasks) if t == task]
        kept = np.array([(1.0 - frequency.get(questions[i]["question"], 0.0)) ** draws for i in rows])
        raw = 1.0 / np.maximum(kept, 1.0 / cap)
        share = task_shares.get(task, 0.0) / total_share if total_share else 0.0
        weights[rows] = raw / raw.sum() * share * len(questions)
        record[task] = {"kept": len(rows), "removed_in_stream": removed_here, "effective_draws": round(draws, 1),
                        "raw_weight_range": [round(float(raw.min()), 3), round(float(raw.max()), 3)]}
    return weights, record
