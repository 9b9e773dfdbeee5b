"""Data-Diverse Drafts partitions: split the response pool into disjoint cells, one per draft.

A scheme "G x S" splits the prompts into G disjoint groups (a seeded permutation of the unique
`prompt_id`s cut into nearly equal parts) and the responses into S slots (`response_slot % S`);
cell `partition = group * S + slot`, so "2x3" gives partitions 0..5 and draft k trains on cell k only.
The scheme is recorded as JSON in `dataset.info.description` and read back by `partition_scheme`.
"""

from __future__ import annotations

import json
import re

import numpy as np
from datasets import Dataset

__all__ = ["partition_dataset", "partition_scheme", "select_partition", "parse_scheme"]

_SCHEME = re.compile(r"^\s*(\d+)\s*[x×X]\s*(\d+)\s*$")
_SCHEME_KEYS = ("num_prompt_groups", "num_response_slots", "seed", "num_partitions", "prompt_groups")


def parse_scheme(scheme: str) -> tuple[int, int]:
    """"2x3" (or "2×3") -> (num_prompt_groups, num_response_slots), both >= 1."""
    match = _SCHEME.match(scheme) if isinstance(scheme, str) else None
    if match is None or min(int(match.group(1)), int(match.group(2))) < 1:
        raise ValueError(f"Partition scheme must look like '2x3' (prompt groups x response slots, both >= 1), "
                         f"got {scheme!r}.")
    return int(match.group(1)), int(match.group(2))


def _check(dataset: Dataset, num_prompt_groups: int, num_response_slots: int) -> tuple[list[int], list[int]]:
    """Validate before doing anything; returns the (prompt_id, response_slot) columns."""
    for name, value in (("num_prompt_groups", num_prompt_groups), ("num_response_slots", num_response_slots)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    missing = [c for c in ("prompt_id", "response_slot") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"Dataset lacks columns {missing} (has {dataset.column_names}); partition the output "
                         "of trainers.data.generate_responses.")
    if len(dataset) == 0:
        raise ValueError("Dataset is empty; there is nothing to partition.")
    prompt_ids, slots = list(dataset["prompt_id"]), list(dataset["response_slot"])
    num_prompts, num_responses = len(set(prompt_ids)), len(set(slots))
    if num_prompt_groups > num_prompts:
        raise ValueError(f"`num_prompt_groups`={num_prompt_groups} exceeds the {num_prompts} prompts in the "
                         "dataset; use at most that many groups.")
    if num_response_slots > num_responses:
        raise ValueError(f"`num_response_slots`={num_response_slots} exceeds the {num_responses} responses per "
                         "prompt; use at most that many slots or generate more responses.")
    return prompt_ids, slots


def partition_dataset(dataset: Dataset, num_prompt_groups: int, num_response_slots: int,
                      seed: int = 0) -> Dataset:
    """Add an int column `partition` = prompt group * num_response_slots + response slot.

    Args:
        dataset: rows with `prompt_id` and `response_slot` (from `generate_responses`).
        num_prompt_groups: G disjoint prompt groups, sizes differing by at most one.
        num_response_slots: S slots; a row's slot is `response_slot % S`.
        seed: seed of the prompt permutation; the same seed gives the same partition.

    Returns:
        A new dataset (an existing `partition` column is replaced) whose `info.description` holds the
        scheme as JSON; read it with `partition_scheme`.
    """
    prompt_ids, slots = _check(dataset, num_prompt_groups, num_response_slots)
    unique_ids = sorted(set(prompt_ids))
    permuted = np.random.default_rng(seed).permutation(unique_ids)
    groups = [sorted(int(i) for i in part) for part in np.array_split(permuted, num_prompt_groups)]
    group_of = {prompt_id: g for g, members in enumerate(groups) for prompt_id in members}
    partitions = [group_of[p] * num_response_slots + s % num_response_slots for p, s in zip(prompt_ids, slots)]
    if "partition" in dataset.column_names:
        dataset = dataset.remove_columns("partition")
    result = dataset.add_column("partition", partitions)
    scheme = {"num_prompt_groups": num_prompt_groups, "num_response_slots": num_response_slots, "seed": seed,
              "num_partitions": num_prompt_groups * num_response_slots,
              "prompt_groups": {str(g): members for g, members in enumerate(groups)}}
    result.info.description = json.dumps(scheme)
    return result


def partition_scheme(dataset: Dataset) -> dict:
    """The scheme `partition_dataset` recorded: keys num_prompt_groups, num_response_slots, seed,
    num_partitions, prompt_groups ({group int: sorted prompt ids})."""
    try:
        scheme = json.loads(dataset.info.description or "")
    except json.JSONDecodeError:
        scheme = None
    if not isinstance(scheme, dict) or any(key not in scheme for key in _SCHEME_KEYS):
        raise ValueError("Dataset carries no partition scheme in `info.description`; "
                         "call trainers.partition.partition_dataset on it first.")
    scheme["prompt_groups"] = {int(g): members for g, members in scheme["prompt_groups"].items()}
    return scheme


def select_partition(dataset: Dataset, index: int) -> Dataset:
    """The rows of cell `index` (what draft `index` trains on)."""
    num_partitions = partition_scheme(dataset)["num_partitions"]
    if not isinstance(index, (int, np.integer)) or not 0 <= index < num_partitions:
        raise ValueError(f"Partition index must be an int in [0, {num_partitions - 1}], got {index!r}.")
    rows = [i for i, p in enumerate(dataset["partition"]) if p == index]
    return dataset.select(rows)
