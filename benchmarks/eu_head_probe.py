"""Probe: what the other models of the composite would add to the EU head's inputs (issue "EU quality", variant 4).

Usage (after the EU-head data exists; about 30 minutes on 2 CPU cores the first time, minutes once the
per-folder scores are cached):

    python -m benchmarks.eu_head_probe --data_dir .train-defaults/eu-head-data .train-defaults/eu-head-data-2

On the EU head's training data (target answers with their 16-copy ground truth, `trainers.eu_head_data`) it
scores every answer with the shipped composite's `hf_eu` (the drafts' variance and bias) and `proxy_entropy`
(cached per folder in `probe_composite_scores.npz`, keyed by the fingerprints of target, drafts and proxy), then fits gradient
boosting (scikit-learn, 5-fold cross-validation grouped by answer) on log ground truth from the head's own
inputs (the target's feature values and top-8 log-probs) alone and with each extra input. Writes token-level
Spearman per input set to `benchmarks/results/eu_head_probe.json`.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from benchmarks.common import command, machine, write_result

EXTRA = ("draft_variance", "draft_bias", "proxy_entropy")
INPUT_SETS = {"target features": (), "+ draft variance": ("draft_variance",), "+ draft bias": ("draft_bias",),
              "+ proxy entropy": ("proxy_entropy",), "+ all three": EXTRA}


def _composite_scores(model, folder: str, answer_index: np.ndarray, fingerprint: str) -> np.ndarray:
    """`(tokens, 3)` draft variance, draft bias and proxy entropy of every answer token of `folder` (in the order
    of `answer_index`, `load_data`'s), cached; one teacher-forced pass per answer for both estimators."""
    from hf_eu import get_estimator, score_tokens_many

    cache = os.path.join(folder, "probe_composite_scores.npz")
    if os.path.isfile(cache):
        stored = np.load(cache)
        if str(stored["fingerprint"]) == fingerprint:
            return stored["scores"]
    rows = json.load(open(os.path.join(folder, "answers.json")))
    estimators = [get_estimator("hf_eu"), get_estimator("proxy_entropy")]
    per_answer = []
    for index in np.unique(answer_index).tolist():
        row = rows[index]
        ids = torch.tensor([row["prompt_ids"] + row["answer_ids"]])
        with torch.no_grad():
            out = score_tokens_many(estimators, ids, len(row["prompt_ids"]), drafts=model.drafts, proxy=model.proxy,
                                    target=model.target)
        per_answer.append(np.stack([out["hf_eu"].eu_variance[0].numpy(), out["hf_eu"].eu_bias[0].numpy(),
                                    out["proxy_entropy"].epistemic_uncertainty[0].numpy()], 1))  # (T, 3)
    scores = np.concatenate(per_answer)
    np.savez(cache + ".tmp.npz", scores=scores, fingerprint=np.array(fingerprint))
    os.replace(cache + ".tmp.npz", cache)
    return scores


def _spearman_cv(inputs: np.ndarray, truth: np.ndarray, groups: np.ndarray) -> float:
    from scipy.stats import spearmanr
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.model_selection import GroupKFold

    predicted = np.zeros(len(truth))
    for train, test in GroupKFold(5).split(inputs, truth, groups):
        model = HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05, random_state=0)
        predicted[test] = model.fit(inputs[train], np.log(truth[train] + 1e-3)).predict(inputs[test])
    return round(float(spearmanr(predicted, truth)[0]), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", nargs="+", required=True, help="folders written by trainers.eu_head_data")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "eu_head_probe.json"))
    args = parser.parse_args()
    from hf_eu import UncertaintyAwareModelForCausalLM
    from hf_eu.defaults import DEFAULT_COMPOSITE_DIR
    from hf_eu.embedded import load_embedded_target
    from hf_eu.fingerprint import model_fingerprint
    from trainers.eu_head_data import load_data

    target, _ = load_embedded_target()
    model = UncertaintyAwareModelForCausalLM.from_pretrained(DEFAULT_COMPOSITE_DIR, target=target)
    fingerprint = "|".join(model_fingerprint(part) for part in [model.target, *model.drafts, model.proxy])
    parts, extra = [], []
    for number, folder in enumerate(args.data_dir):
        part = load_data(folder)
        extra.append(_composite_scores(model, folder, part["answer_index"], fingerprint))
        part["answer_index"] = part["answer_index"] + 1_000_000 * number  # answers of folders stay apart
        parts.append(part)
    data = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    extra = np.log(np.maximum(np.concatenate(extra), 1e-8))  # (N, 3)
    base = np.concatenate([data["values"], data["topk_logps"][:, :8]], 1)  # (N, F + 8)
    spearman = {name: _spearman_cv(np.concatenate([base, extra[:, [EXTRA.index(c) for c in cols]]], 1),
                                   data["ground_truth"], data["answer_index"])
                for name, cols in INPUT_SETS.items()}
    print(spearman)
    write_result({"spearman": spearman, "tokens": int(len(data["ground_truth"])),
                  "answers": int(len(np.unique(data["answer_index"]))), "data_dir": args.data_dir,
                  "model": "HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05) on log(EU + 1e-3), "
                           "GroupKFold(5) by answer",
                  "command": command("benchmarks.eu_head_probe"), "machine": machine()}, args.out)


if __name__ == "__main__":
    main()
