"""Fit `hf_eu_calibrated`'s regressor: greedy answers, ground-truth EU, per-token features, scikit-learn.

The pieces are also what the evaluation benchmark runs, so both measure the same way:
- `answer_greedily`: the target answers chat-formatted questions greedily, in left-padded batches,
  timing each batch (plain `generate`, the cost reference);
- `token_values`: per-answer-token values of any estimator (registered, or the ground truth built by
  `hf_eu.estimators.perturbed_ensemble_estimator`) through `hf_eu.score_tokens`, one answer per list item;
- `calibration_features`: the `(T, 4)` features of `hf_eu.estimators.CALIBRATION_FEATURES` per answer;
- `fit_calibrator`: a scikit-learn `MLPRegressor` on log-features, exported to `hf_eu.calibration.EUCalibrator`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from hf_eu import score_tokens
from hf_eu.calibration import EUCalibrator
from hf_eu.estimators import CALIBRATION_FEATURES, Estimator, get_estimator

__all__ = ["Answer", "answer_greedily", "token_values", "calibration_features", "fit_calibrator"]


class Answer(dict):
    """One greedy answer: `prompt_ids` (P,), `answer_ids` (T,) without padding or what follows EOS,
    `text`, `seconds` (its share of the batch's generation time)."""


def _chat_prompts(tokenizer, questions: Sequence[str]) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"] for q in questions]


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask  # (B, P) each


def answer_greedily(target, tokenizer, questions: Sequence[str], *, max_new_tokens: int, batch_size: int = 8,
                    progress: bool = True) -> list[Answer]:
    """Greedy chat answers of `target`, batched with left padding (rows are independent of their batch)."""
    from hf_eu import generated_token_mask

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = _chat_prompts(tokenizer, questions)
    answers: list[Answer] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="greedy answers", disable=not progress):
        rows = prompts[start:start + batch_size]
        ids, mask = _left_pad(rows, pad_id)
        began = time.perf_counter()
        with torch.no_grad():
            out = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=pad_id)
        seconds = time.perf_counter() - began
        new = out[:, ids.shape[1]:]  # (B, T)
        keep = generated_token_mask(new, target.generation_config.eos_token_id, pad_id)  # (B, T)
        for row, prompt in enumerate(rows):
            answer_ids = new[row][keep[row]]
            answers.append(Answer(prompt_ids=torch.tensor(prompt), answer_ids=answer_ids, seconds=seconds / len(rows),
                                  text=tokenizer.decode(answer_ids, skip_special_tokens=True)))
    return answers


def _answer_batch(answers: Sequence[Answer], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Prompts left-padded to P, answers right-padded to T: ids and mask (B, P + T), P, answer mask (B, T)."""
    prompt_ids, prompt_mask = _left_pad([a["prompt_ids"].tolist() for a in answers], pad_id)
    width = max(len(a["answer_ids"]) for a in answers)
    answer_ids = torch.full((len(answers), width), pad_id, dtype=torch.long)
    answer_mask = torch.zeros((len(answers), width), dtype=torch.bool)
    for i, a in enumerate(answers):
        answer_ids[i, :len(a["answer_ids"])] = a["answer_ids"]
        answer_mask[i, :len(a["answer_ids"])] = True
    ids = torch.cat([prompt_ids, answer_ids], dim=1)  # (B, P + T)
    mask = torch.cat([prompt_mask, answer_mask.long()], dim=1)
    return ids, mask, prompt_ids.shape[1], answer_mask


def token_values(estimator: Estimator | str, answers: Sequence[Answer], *, drafts, proxy, target, pad_id: int,
                 batch_size: int = 8, field: str = "epistemic_uncertainty", progress: bool = False,
                 **score_kwargs: Any) -> tuple[list[np.ndarray], float]:
    """Per-token `field` of `estimator` on each answer (a float64 array of its length), and the seconds it took."""
    estimator = get_estimator(estimator) if isinstance(estimator, str) else estimator
    values, seconds = [], 0.0
    for start in tqdm(range(0, len(answers), batch_size), desc=estimator.name, disable=not progress):
        chunk = [a for a in answers[start:start + batch_size]]
        scored = [a for a in chunk if len(a["answer_ids"])]
        by_id = {}
        if scored:
            ids, mask, prompt_length, answer_mask = _answer_batch(scored, pad_id)
            began = time.perf_counter()
            out = score_tokens(estimator, ids, prompt_length, drafts=drafts, proxy=proxy, target=target,
                               attention_mask=mask, uncertainty_mask=answer_mask, **score_kwargs)
            seconds += time.perf_counter() - began
            field_values = getattr(out, field)
            by_id = {id(a): field_values[i, :len(a["answer_ids"])].double().numpy() for i, a in enumerate(scored)}
        values += [by_id.get(id(a), np.zeros(0)) for a in chunk]
    return values, seconds


def calibration_features(answers: Sequence[Answer], *, drafts, proxy, target, pad_id: int,
                         batch_size: int = 8) -> list[np.ndarray]:
    """`(T, 4)` features per answer, columns `CALIBRATION_FEATURES` (draft JSD, bias, proxy and target entropy)."""
    kwargs = dict(drafts=drafts, proxy=proxy, target=target, pad_id=pad_id, batch_size=batch_size)
    variance, _ = token_values("hf_eu", answers, field="eu_variance", **kwargs)
    bias, _ = token_values("hf_eu", answers, field="eu_bias", **kwargs)
    proxy_entropy, _ = token_values("proxy_entropy", answers, **kwargs)
    target_entropy, _ = token_values("entropy", answers, **kwargs)
    assert CALIBRATION_FEATURES == ("draft_jsd", "bias", "proxy_entropy", "target_entropy")
    return [np.stack(columns, axis=-1) for columns in zip(variance, bias, proxy_entropy, target_entropy)]


def fit_calibrator(features: np.ndarray, targets: np.ndarray, *, hidden_layer_sizes: tuple[int, ...] = (16,),
                   floor: float = 1e-4, seed: int = 0, info: dict | None = None) -> EUCalibrator:
    """Fit an MLP from standardized log-features `(N, 4)` to EU `(N,)` (squared error) and export it."""
    from sklearn.neural_network import MLPRegressor

    features, targets = np.asarray(features, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    if features.ndim != 2 or features.shape[1] != len(CALIBRATION_FEATURES) or len(features) != len(targets):
        raise ValueError(f"Need features (N, {len(CALIBRATION_FEATURES)}) and targets (N,), got {features.shape} "
                         f"and {targets.shape}.")
    if len(targets) < 10:
        raise ValueError(f"Only {len(targets)} tokens to fit the calibrator on; answer more calibration questions.")
    logged = np.log(np.clip(features, 0, None) + floor)
    mean, std = logged.mean(0), logged.std(0) + 1e-8
    regressor = MLPRegressor(hidden_layer_sizes=hidden_layer_sizes, alpha=1e-3, learning_rate_init=3e-3,
                             max_iter=2000, early_stopping=True, n_iter_no_change=50, random_state=seed)
    regressor.fit((logged - mean) / std, targets)
    prediction = np.clip(regressor.predict((logged - mean) / std), 0, None)
    record = dict(info or {}, tokens=int(len(targets)), hidden_layer_sizes=list(hidden_layer_sizes),
                  fit_rmse=float(np.sqrt(np.mean((prediction - targets) ** 2))), regressor="sklearn MLPRegressor")
    return EUCalibrator(CALIBRATION_FEATURES, torch.tensor(mean), torch.tensor(std),
                        [torch.tensor(w) for w in regressor.coefs_], [torch.tensor(b) for b in regressor.intercepts_],
                        floor=floor, info=record)
