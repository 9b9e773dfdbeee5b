"""Batch rows of prompt + response token ids for distillation, with labels only where the loss looks.

Rows hold `input_ids` (prompt then response, unpadded) and optionally `prompt_length`,
`teacher_topk_ids` and `teacher_topk_logps` (one list of k entries per response token, as
`trainers.data.generate_responses` writes them). The collator right-pads to the longest row and
returns:
- `input_ids`, `attention_mask`: `(B, L)`;
- `labels`: `(B, L)`, the token ids on response positions and -100 on prompt and padding
  (transformers' convention: logits at position t predict `labels[t + 1]`);
- `teacher_topk_ids` (long) and `teacher_topk_logps` (float): `(B, L, k)`, aligned with `labels`:
  entry `[b, t]` is the teacher's top-k distribution over the token at position t.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DistillationCollator"]


@dataclass
class DistillationCollator:
    """Pads rows and builds labels; see the module docstring for the batch layout.

    Args:
        pad_token_id: id used for padding `input_ids` (padding is masked out anyway).
    """

    pad_token_id: int = 0

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("Cannot collate an empty list of rows.")
        length = max(len(row["input_ids"]) for row in rows)
        batch_size = len(rows)
        input_ids = torch.full((batch_size, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
        labels = torch.full((batch_size, length), -100, dtype=torch.long)
        for b, row in enumerate(rows):
            ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
            prompt_length = int(row.get("prompt_length", 1))
            input_ids[b, : len(ids)] = ids
            attention_mask[b, : len(ids)] = 1
            labels[b, prompt_length : len(ids)] = ids[prompt_length:]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if "teacher_topk_ids" in rows[0]:
            batch.update(self._teacher_topk(rows, length))
        return batch

    @staticmethod
    def _teacher_topk(rows: list[dict[str, Any]], length: int) -> dict[str, torch.Tensor]:
        top_k = len(rows[0]["teacher_topk_ids"][0])
        ids = torch.zeros((len(rows), length, top_k), dtype=torch.long)  # (B, L, k)
        logps = torch.zeros((len(rows), length, top_k), dtype=torch.float32)  # (B, L, k)
        for b, row in enumerate(rows):
            start = int(row.get("prompt_length", 1))
            count = len(row["teacher_topk_ids"])
            if start + count != len(row["input_ids"]):
                raise ValueError(f"Row {b}: {count} teacher top-k entries for {len(row['input_ids']) - start} response "
                                 "tokens; regenerate the data with `generate_responses(..., top_k_logprobs=k)`.")
            ids[b, start : start + count] = torch.as_tensor(row["teacher_topk_ids"], dtype=torch.long)
            logps[b, start : start + count] = torch.as_tensor(row["teacher_topk_logps"], dtype=torch.float32)
        return {"teacher_topk_ids": ids, "teacher_topk_logps": logps}
