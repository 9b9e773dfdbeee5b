"""Design points of Gaussian distillation: hidden states of the teacher members and of the student's
backbone at every response position of the training rows, collected once and cached on disk.

A design point is a position whose logits predict a response token (causal shift, stated once:
position `prompt_length - 1 + j` predicts response token j), i.e. exactly where hf_eu reports EU.
The observation of member m there is its last hidden state after the final norm, which its output
head maps to the logits; the student's mean and factors live in the same space because it shares
that head (checked by `check_shared_head`).

`TeacherEnsemble` hands out the members one at a time: explicit models (e.g. hf_eu's drafts), or one
target under `LowRankGaussianPerturbation`, one seed per member (an implicit ensemble that never
holds two copies of the weights). `collect_hidden_states` runs one model over the rows (length-sorted
batches); `collect_design_points` does it for the student's backbone and every member, writing each
result to `<cache_dir>/<name>.safetensors` with a fingerprint of the rows and the model's
description, so a rerun loads what was finished instead of recomputing it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from hf_eu.gaussian import decoder_hidden_states
from hf_eu.perturbation import LowRankGaussianPerturbation

__all__ = [
    "TeacherEnsemble",
    "check_shared_head",
    "collect_design_points",
    "collect_hidden_states",
    "rows_fingerprint",
]


class TeacherEnsemble:
    """The members of a teacher ensemble: explicit `models`, or a `target` under seeded `perturbation`s."""

    def __init__(self, models: Sequence[nn.Module] | None = None, *, target: nn.Module | None = None,
                 perturbation: LowRankGaussianPerturbation | None = None, seeds: Sequence[int] | None = None):
        if (models is None) == (target is None):
            raise ValueError("Give the teacher ensemble either as `models=[...]` or as `target=` with a perturbation "
                             "and seeds, not both and not neither.")
        if models is not None:
            if isinstance(models, nn.Module) or len(models) < 2:
                raise ValueError(f"An ensemble needs at least 2 teacher models, got {models!r}; pass a list.")
        elif perturbation is None or seeds is None or len(set(seeds)) != len(seeds) or len(seeds) < 2:
            raise ValueError(f"A perturbed-target ensemble needs a `perturbation` and ≥ 2 distinct `seeds`, got {seeds!r}.")
        elif perturbation.model is not target:
            raise ValueError("`perturbation` was built for another model than `target`; build it with "
                             "`LowRankGaussianPerturbation(target, ...)`.")
        self.models, self.target, self.perturbation = models, target, perturbation
        self.seeds = list(seeds) if seeds is not None else None

    def __len__(self) -> int:
        return len(self.models) if self.models is not None else len(self.seeds)

    def model(self, index: int) -> nn.Module:
        """The module member `index` runs through (inside `member(index)` it carries its perturbation)."""
        return self.models[index] if self.models is not None else self.target

    @contextmanager
    def member(self, index: int) -> Iterator[nn.Module]:
        """Context in which member `index` is the model yielded."""
        context = self.perturbation.apply(self.seeds[index]) if self.models is None else nullcontext()
        with context:
            yield self.model(index)

    def describe(self, index: int) -> str:
        """What member `index` is (its cache fingerprint)."""
        if self.models is not None:
            name = getattr(getattr(self.models[index], "config", None), "_name_or_path", "")
            return f"model {index} {type(self.models[index]).__name__} {name}"
        config = self.perturbation.config
        return (f"perturbed target seed {self.seeds[index]} rank {config.rank} sigma {config.sigma} "
                f"modules {','.join(config.target_modules)}")


def check_shared_head(student_head: nn.Module, teachers: TeacherEnsemble) -> None:
    """Raise ValueError unless every member's output head has the student's head weights."""
    weight = student_head.weight
    for index in range(len(teachers)):
        head = teachers.model(index).get_output_embeddings()
        if head is None or head.weight.shape != weight.shape or not torch.equal(head.weight.to(weight), weight):
            raise ValueError(f"Teacher member {index} has another output head than the student. Gaussian distillation "
                             "fits the members' last hidden states, which only share the student's space through the "
                             "same head: use perturbed copies of the target, drafts cut from it, or a student whose "
                             "backbone is (a truncated copy of) the teachers' model.")


def _rows(rows: Any) -> list[tuple[list[int], int]]:
    pairs = [(list(row["input_ids"]), int(row.get("prompt_length", 1))) for row in rows]
    for index, (ids, prompt_length) in enumerate(pairs):
        if not 1 <= prompt_length < len(ids):
            raise ValueError(f"Row {index} has prompt_length {prompt_length} and {len(ids)} tokens: it has no response "
                             "token to use as a design point. Drop it or fix its prompt_length.")
    return pairs


def rows_fingerprint(rows: Any) -> str:
    """sha256 of the rows' token ids and prompt lengths."""
    digest = hashlib.sha256()
    for ids, prompt_length in _rows(rows):
        digest.update(json.dumps([prompt_length, ids]).encode())
    return digest.hexdigest()


def collect_hidden_states(model: nn.Module, rows: Any, batch_size: int = 8, desc: str | None = None) -> torch.Tensor:
    """Last hidden states `(N, D)` float32 of `model` at every design point of `rows`, in row order."""
    pairs = _rows(rows)
    offsets = [0]
    for ids, prompt_length in pairs:
        offsets.append(offsets[-1] + len(ids) - prompt_length)
    device = next(model.parameters()).device
    states = None
    order = sorted(range(len(pairs)), key=lambda k: len(pairs[k][0]))  # similar lengths, little padding
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, disable=desc is None):
            width = max(len(pairs[k][0]) for k in batch)
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)  # (B, L), right padded
            attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
            for b, k in enumerate(batch):
                input_ids[b, : len(pairs[k][0])] = torch.tensor(pairs[k][0])
                attention_mask[b, : len(pairs[k][0])] = 1
            hidden = decoder_hidden_states(model, input_ids=input_ids.to(device),
                                           attention_mask=attention_mask.to(device)).last_hidden_state  # (B, L, D)
            if states is None:
                states = torch.empty(offsets[-1], hidden.shape[-1])
            for b, k in enumerate(batch):
                ids, prompt_length = pairs[k]
                states[offsets[k] : offsets[k + 1]] = hidden[b, prompt_length - 1 : len(ids) - 1].float().cpu()
    return states


def _cached(path: str | None, fingerprint: str, compute) -> torch.Tensor:
    if path is not None and os.path.isfile(path):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            stored = (handle.metadata() or {}).get("fingerprint")
        if stored == fingerprint:
            return load_file(path)["hidden_states"]
    states = compute()
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = path + ".partial"
        save_file({"hidden_states": states.contiguous()}, partial, metadata={"fingerprint": fingerprint})
        os.replace(partial, path)  # atomic: a file there is always complete
    return states


def collect_design_points(backbone: nn.Module, teachers: TeacherEnsemble, rows: Any, batch_size: int = 8,
                          cache_dir: str | None = None, backbone_name: str = "student backbone"
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The student backbone's hidden states `(N, D)` (the model's inputs) and the members' `(M, N, D)`.

    With `cache_dir`, each result is stored there and reused when its fingerprint (rows + description)
    matches; delete the folder after changing a model's weights under the same description.
    """
    rows_hash = rows_fingerprint(rows)

    def path(name: str) -> str | None:
        return os.path.join(cache_dir, f"{name}.safetensors") if cache_dir else None

    inputs = _cached(path("student"), f"{rows_hash} {backbone_name} {type(backbone).__name__}",
                     lambda: collect_hidden_states(backbone, rows, batch_size, desc="student backbone"))
    members = []
    for index in range(len(teachers)):
        def compute(index=index):
            with teachers.member(index) as model:
                return collect_hidden_states(model, rows, batch_size, desc=f"teacher member {index}")

        members.append(_cached(path(f"member_{index}"), f"{rows_hash} {teachers.describe(index)}", compute))
    return inputs, torch.stack(members)  # (N, D), (M, N, D)
