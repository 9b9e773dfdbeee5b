"""Question sources for training and evaluation: GSM8K and seeded reasoning-gym task presets.

Every source returns a list of plain dicts `{"question", "answer", ...}` where `answer` is the final
answer as a string (for GSM8K the number after "####", commas removed).

Seeds keep training and evaluation apart: evaluation uses seeds `0 <= seed < TRAIN_SEED_OFFSET` (1000),
training uses `training_seed(k) = TRAIN_SEED_OFFSET + k`. reasoning-gym seeds item `i` of a dataset
with `random.Random(seed + i)`, so consecutive raw seeds share almost all items; the presets here pass
`seed * _SEED_STRIDE` instead, which keeps the item streams of different seeds disjoint for any
`n <= _SEED_STRIDE`. (Distinct seeds do not make distinct *texts*: "arith_basic" has only a few
thousand possible questions, so small task spaces repeat across seeds.)
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

__all__ = [
    "gsm8k_questions",
    "reasoning_gym_questions",
    "training_seed",
    "TRAIN_SEED_OFFSET",
    "REASONING_GYM_PRESETS",
]

# Evaluation uses seeds below this; training uses TRAIN_SEED_OFFSET + k.
TRAIN_SEED_OFFSET = 1000
# reasoning-gym base seed = seed * _SEED_STRIDE, so item streams of different seeds never overlap.
_SEED_STRIDE = 1_000_000

# preset name -> (reasoning-gym dataset name, config keyword arguments)
REASONING_GYM_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "gsm_symbolic": ("gsm_symbolic", {}),
    # allow_parentheses=True takes reasoning-gym's self-consistent code path (the answer is the
    # evaluated expression; its parenthesis-free path can print a divisor it did not use). Terms are
    # in -9..9 and may be wrapped in parentheses; allow_negation=False avoids "-(...)".
    "arith_basic": ("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1,
                                         "allow_parentheses": True, "allow_negation": False}),
    # Two positive one-digit terms joined by + or * (no division, so the parenthesis-free path is exact).
    "arith_add_mul": ("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1,
                                           "operators": ("+", "*"), "allow_parentheses": False,
                                           "allow_negation": False}),
    "arith_chain_sum": ("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}),
    "arith_products": ("products", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}),
}

_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def training_seed(k: int = 0) -> int:
    """The k-th training seed: `TRAIN_SEED_OFFSET + k`, never used by evaluation (seeds < 1000)."""
    if k < 0:
        raise ValueError(f"`k` must be >= 0, got {k}.")
    return TRAIN_SEED_OFFSET + k


def _gsm8k_final_answer(answer: str, index: int) -> str:
    match = _GSM8K_FINAL.search(answer)
    if match is None:
        raise ValueError(f"GSM8K row {index} has no '#### N' final answer: {answer[-80:]!r}; "
                         "pass a file with the GSM8K schema (columns `question`, `answer`).")
    return match.group(1).replace(",", "").strip()


def _load_gsm8k(path_or_id: str, split: str):
    from datasets import load_dataset

    suffix = os.path.splitext(path_or_id)[1].lower()
    if suffix in _LOCAL_FORMATS:
        if not os.path.isfile(path_or_id):
            raise FileNotFoundError(f"GSM8K file {path_or_id!r} does not exist; pass an existing "
                                    ".jsonl/.json/.parquet file or a hub id such as 'openai/gsm8k'.")
        return load_dataset(_LOCAL_FORMATS[suffix], data_files={split: path_or_id}, split=split)
    return load_dataset(path_or_id, "main", split=split)


def gsm8k_questions(path_or_id: str = "openai/gsm8k", split: str = "train", limit: int | None = None,
                    seed: int = 0) -> list[dict]:
    """GSM8K questions with their final numeric answers.

    Args:
        path_or_id: a hub id (loaded as `load_dataset(path_or_id, "main", split=split)`) or a local
            .jsonl/.json/.parquet file with columns `question` and `answer` (answer ending "#### N").
        split: "train" or "test" for the hub dataset; the split name given to a local file.
        limit: keep this many questions, drawn by a permutation seeded with `seed`; None keeps all,
            in file order.
        seed: seed of that draw (unused when `limit` is None).

    Returns:
        `[{"question": str, "answer": str}]`, answer = the number after "####", commas removed.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"`limit` must be None or >= 0, got {limit}.")
    dataset = _load_gsm8k(path_or_id, split)
    missing = {"question", "answer"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"{path_or_id!r} lacks columns {sorted(missing)} (has {dataset.column_names}); "
                         "GSM8K rows need `question` and `answer`.")
    questions, answers = list(dataset["question"]), list(dataset["answer"])
    order = range(len(questions))
    if limit is not None:
        order = np.random.default_rng(seed).permutation(len(questions))[:limit].tolist()
    return [{"question": questions[i], "answer": _gsm8k_final_answer(answers[i], i)} for i in order]


def reasoning_gym_questions(task: str, n: int, seed: int) -> list[dict]:
    """`n` questions of a named reasoning-gym preset; the same seed gives the same questions.

    Args:
        task: one of `REASONING_GYM_PRESETS`: "gsm_symbolic", "arith_basic" (two one-digit terms, any
            of + - * /), "arith_add_mul" (two one-digit terms, + or *), "arith_chain_sum" (a + b or a - b, 1-2 digits), "arith_products" (a * b,
            1-2 digits).
        n: number of questions, 0 <= n <= 1,000,000.
        seed: evaluation uses seeds < TRAIN_SEED_OFFSET, training `training_seed(k)`.

    Returns:
        `[{"question": str, "answer": str, "task": task}]`.
    """
    if task not in REASONING_GYM_PRESETS:
        raise ValueError(f"Unknown reasoning-gym preset {task!r}; available: {sorted(REASONING_GYM_PRESETS)}.")
    if not 0 <= n <= _SEED_STRIDE:
        raise ValueError(f"`n` must be in [0, {_SEED_STRIDE}], got {n}.")
    if seed < 0:
        raise ValueError(f"`seed` must be >= 0, got {seed}.")
    if n == 0:
        return []
    try:
        import reasoning_gym
    except ImportError as error:  # a dev dependency, not a runtime one
        raise ImportError("reasoning_gym_questions needs reasoning-gym: "
                          "pip install 'reasoning-gym>=0.1.20'.") from error
    name, config = REASONING_GYM_PRESETS[task]
    dataset = reasoning_gym.create_dataset(name, seed=seed * _SEED_STRIDE, size=n, **config)
    return [{"question": item["question"], "answer": str(item["answer"]), "task": task} for item in dataset]
