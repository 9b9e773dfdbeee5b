"""Answers, per-token values of every estimator and the ground truth, and their cost, cached for resuming.

Each stage writes into `<cache>/<set>/`: `answers.json` once all answers exist, then one
`scores-<batch>.npz` per batch of answers (every estimator's per-token values for those answers,
concatenated, keyed by a digest of the batch's answers), then `timing.json`. A rerun skips whatever is complete,
so an interrupted run continues at the batch it stopped in, and a set that grows keeps its cached answers and the
scores of every batch whose answers did not change. Files are written aside and renamed.

The ground truth and all estimators of the main composite run in one `score_tokens_many` sweep per batch
(each perturbed copy once; TokUR M = 4 uses the first four of TokUR M = 8's seeds); `hf_eu_idd` runs the
IDD drafts with the same proxy. Timing is measured separately, one estimator at a time, on the first
answers of the set, and compared with the plain generation time of the same answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.answers import answers_match, extract_answer
from benchmarks.eval_setup import GROUND_TRUTH_SEEDS_START, TOKUR_SEEDS_START, Models, Scale
from hf_eu.estimators import get_estimator, list_estimators, perturbed_ensemble_estimator
from hf_eu.perturbation import LowRankGaussianPerturbation
from hf_eu.scoring import score_tokens_many
from trainers.calibration import Answer, _answer_batch, answer_greedily

__all__ = ["estimator_names", "collect_answers", "collect_scores", "collect_timing", "forward_flops",
           "forget_estimators"]

GROUND_TRUTH = "ground_truth"
_KEY = "_batch_key"  # not an estimator: the digest of the answers a scores file belongs to
_MAIN = ["hf_eu", "hf_eu_variance_only", "hf_eu_no_osd", "hf_eu_k2", "tokur_m4", "tokur_m8", "entropy", "max_prob",
         "neg_logprob", "proxy_entropy"]


def estimator_names(models: Models) -> list[str]:
    """Estimators this run evaluates: the paper's, the baselines, and those the composite makes possible."""
    names = list(_MAIN) + ["hf_eu_idd"]
    if models.calibrator is not None:
        names.append("hf_eu_calibrated")
    if models.student is not None:
        names += ["gaussian_distill", "gaussian_distill_sampled"]
    if models.eu_head is not None:
        names.append("eu_head")
        if getattr(models.eu_head, "proxy_head", None) is not None and models.proxy is not None:
            names.append("eu_head_proxy")
    return names


def _write_json(path: str, payload) -> None:
    with open(path + ".tmp", "w") as handle:
        json.dump(payload, handle)
    os.replace(path + ".tmp", path)


def collect_answers(models: Models, questions: list[dict], scale: Scale, set_name: str, folder: str) -> list[Answer]:
    """Greedy answers with correctness labels (cached in `answers.json`; a question answered in an earlier run
    keeps its cached answer, so a scale that grows answers only its new questions)."""
    path = os.path.join(folder, "answers.json")
    cached = {r["question"]: r for r in json.load(open(path))} if os.path.isfile(path) else {}
    missing = [q for q in questions if q["question"] not in cached]
    if missing:
        answers = answer_greedily(models.target, models.tokenizer, [q["question"] for q in missing],
                                  max_new_tokens=scale.max_new_tokens[set_name], batch_size=scale.batch_size)
        for question, answer in zip(missing, answers):
            predicted = extract_answer(answer["text"])
            cached[question["question"]] = dict(
                question=question["question"], gold=question["answer"], task=question.get("task"),
                text=answer["text"], predicted=predicted, correct=answers_match(predicted, question["answer"]),
                prompt_ids=answer["prompt_ids"].tolist(), answer_ids=answer["answer_ids"].tolist(),
                seconds=answer["seconds"])
    rows = [cached[q["question"]] for q in questions]
    if missing or len(cached) != len(rows):
        os.makedirs(folder, exist_ok=True)
        _write_json(path, rows)
    return [Answer(r, prompt_ids=torch.tensor(r["prompt_ids"]), answer_ids=torch.tensor(r["answer_ids"], dtype=torch.long))
            for r in rows]


def _batch_key(batch: list[Answer]) -> np.ndarray:
    """What a cached batch of scores belongs to: a digest of its questions and answer tokens."""
    digest = hashlib.sha256(json.dumps([[a["question"], a["answer_ids"].tolist()] for a in batch]).encode())
    return np.frombuffer(digest.digest()[:8], dtype=np.int64).copy()


def _seeds(scale: Scale) -> dict[str, list[int]]:
    tokur = list(range(TOKUR_SEEDS_START, TOKUR_SEEDS_START + 8))
    return {GROUND_TRUTH: list(range(GROUND_TRUTH_SEEDS_START, GROUND_TRUTH_SEEDS_START + scale.num_perturbed)),
            "tokur_m4": tokur[:4], "tokur_m8": tokur}


def _score_batch(models: Models, names: list[str], batch: list[Answer], scale: Scale,
                 perturbation) -> dict[str, np.ndarray]:
    """Values of `names` (estimators and/or `ground_truth`) on one batch: `{name: concatenated (sum T,) array}`."""
    scored = [a for a in batch if len(a["answer_ids"])]
    extra = ["hf_eu_variance", "hf_eu_bias"] if "hf_eu" in names else []
    if not scored:
        return {name: np.zeros(0) for name in names + extra}
    ids, mask, prompt_length, answer_mask = _answer_batch(scored, models.tokenizer.pad_token_id)
    main = [get_estimator(n) for n in names if n not in ("hf_eu_idd", GROUND_TRUTH)]
    if GROUND_TRUTH in names:
        main.append(perturbed_ensemble_estimator(scale.num_perturbed, GROUND_TRUTH))
    common = dict(proxy=models.proxy, target=models.target, attention_mask=mask, uncertainty_mask=answer_mask,
                  max_chunk_elements=2**28, perturbation=perturbation, perturbation_seeds=_seeds(scale))
    outputs = {}
    if main:
        outputs = score_tokens_many(main, ids, prompt_length, drafts=models.drafts, student=models.student,
                                    calibrator=models.calibrator, eu_head=models.eu_head, **common)
    if "hf_eu_idd" in names:
        outputs.update(score_tokens_many([get_estimator("hf_eu_idd")], ids, prompt_length, drafts=models.idd_drafts,
                                         **common))
    values = {name: out.epistemic_uncertainty[answer_mask].double().numpy() for name, out in outputs.items()}
    if extra:
        values["hf_eu_variance"] = outputs["hf_eu"].eu_variance[answer_mask].double().numpy()
        values["hf_eu_bias"] = outputs["hf_eu"].eu_bias[answer_mask].double().numpy()
    return values


def collect_scores(models: Models, answers: list[Answer], scale: Scale, folder: str,
                   names: list[str], ground_truth: bool = True, from_end: bool = False) -> dict[str, list[np.ndarray]]:
    """`{name: [per-token array of each answer]}` for every estimator (and the ground truth unless
    `ground_truth=False`), batch-resumable. `from_end` scores the batches last to first, so that a second process
    on the same folder meets the first in the middle (a batch already on disk is read, not scored again)."""
    perturbation = LowRankGaussianPerturbation(models.target, rank=scale.perturbation["rank"],
                                               sigma=scale.perturbation["sigma"],
                                               target_modules=scale.perturbation["target_modules"])
    batches = {}
    starts = list(enumerate(range(0, len(answers), scale.batch_size)))
    for number, start in tqdm(starts[::-1] if from_end else starts, desc=f"scoring {os.path.basename(folder)}"):
        batch = answers[start:start + scale.batch_size]
        path = os.path.join(folder, f"scores-{number:05d}.npz")
        stored = dict(np.load(path)) if os.path.isfile(path) else {}
        lengths = np.cumsum([0] + [len(a["answer_ids"]) for a in batch])
        key = _batch_key(batch)
        if stored.pop(_KEY, key).tolist() != key.tolist() or any(len(v) != lengths[-1] for v in stored.values()):
            stored = {}  # scores of other answers (the set grew or changed): score this batch again
        missing = [n for n in names + ([GROUND_TRUTH] if ground_truth else []) if n not in stored]
        if missing:  # a fresh batch, or estimators added since (e.g. a student): score only those
            stored.update(_score_batch(models, missing, batch, scale, perturbation))
            np.savez(path + ".tmp.npz", **stored, **{_KEY: key})
            os.replace(path + ".tmp.npz", path)
        batches[number] = {name: [flat[lengths[i]:lengths[i + 1]] for i in range(len(batch))]
                           for name, flat in stored.items()}
    merged: dict[str, list[np.ndarray]] = {}
    for number in sorted(batches):  # answer order, whichever order the batches were scored in
        for name, values in batches[number].items():
            merged.setdefault(name, []).extend(values)
    return merged


def forget_estimators(cache: str, names: list[str]) -> dict[str, int]:
    """Drop `names` from every cached scores file and timing under `cache/<set>/` (each file rewritten aside and
    renamed), so the next run scores and times only them again; `"timing"` drops every timing. Dropping `hf_eu`
    also drops its parts (`hf_eu_variance`, `hf_eu_bias`). Returns how many files changed per set."""
    names = set(names) | ({"hf_eu_variance", "hf_eu_bias"} if "hf_eu" in names else set())
    unknown = names - set(list_estimators()) - {"timing", "hf_eu_variance", "hf_eu_bias"}
    if unknown or GROUND_TRUTH in names:
        raise ValueError(f"--rescore names estimators of the evaluation, got {sorted(unknown | {GROUND_TRUTH} & names)}; "
                         "the ground truth is never dropped (start over with --fresh for that).")
    changed: dict[str, int] = {}
    folders = sorted(os.path.join(cache, n) for n in os.listdir(cache)) if os.path.isdir(cache) else []
    for folder in (f for f in folders if os.path.isdir(f)):
        count = 0
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.startswith("scores-") and name.endswith(".npz"):
                stored = dict(np.load(path))
                if names & set(stored):
                    np.savez(path + ".tmp.npz", **{k: v for k, v in stored.items() if k not in names})
                    os.replace(path + ".tmp.npz", path)
                    count += 1
            elif name == "timing.json":
                timing = json.load(open(path))
                kept = {} if "timing" in names else {k: v for k, v in timing.items() if k not in names}
                if kept != timing:
                    _write_json(path, kept)
                    count += 1
        changed[os.path.basename(folder)] = count
    return changed


def forward_flops(model: torch.nn.Module) -> float:
    """Forward FLOPs per token ≈ 2 × the weights a token is multiplied by: every parameter except the input
    embedding (a lookup) and merged LoRA factors, plus the output head even when it is tied to the embedding."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
    return 2.0 * (total - embedding.numel() + (head.numel() if head is embedding else 0))


def estimator_flops(models: Models, name: str, scale: Scale) -> float:
    """Forward FLOPs per scored token of the models `name` runs (teacher-forced, as implemented here)."""
    estimator = get_estimator(name)
    flops = 0.0
    drafts = models.idd_drafts if name == "hf_eu_idd" else models.drafts
    if "drafts" in estimator.inputs:
        flops += sum(forward_flops(d) for d in drafts[: estimator.max_drafts or len(drafts)])
    if "reference" in estimator.inputs:
        flops += forward_flops(models.proxy if models.proxy is not None else models.target)
    if "target" in estimator.inputs or "features" in estimator.inputs:  # features: one teacher-forced target pass
        flops += forward_flops(models.target)
    flops += estimator.num_perturbed * forward_flops(models.target)
    if "student" in estimator.inputs and models.student is not None:  # backbone + factor head + q extra head rows
        student = models.student
        head = student.backbone.get_output_embeddings().weight
        flops += forward_flops(student.backbone) + 2.0 * (sum(p.numel() for p in student.head.parameters())
                                                          + student.num_factors * head.numel())
    return flops


def collect_timing(models: Models, answers: list[Answer], scale: Scale, folder: str, names: list[str]) -> dict:
    """Seconds per answer of each estimator's scoring (one at a time) and of plain generation, same answers."""
    path = os.path.join(folder, "timing.json")
    timing = json.load(open(path)) if os.path.isfile(path) else {}
    subset = [a for a in answers if len(a["answer_ids"])][: scale.timing_answers]
    perturbation = LowRankGaussianPerturbation(models.target, rank=scale.perturbation["rank"],
                                               sigma=scale.perturbation["sigma"],
                                               target_modules=scale.perturbation["target_modules"])
    timing["generation"] = float(np.mean([a["seconds"] for a in subset]))
    for name in [n for n in names if n not in timing]:
        drafts = models.idd_drafts if name == "hf_eu_idd" else models.drafts
        seconds = 0.0
        for start in range(0, len(subset), scale.batch_size):
            ids, mask, prompt_length, answer_mask = _answer_batch(subset[start:start + scale.batch_size],
                                                                  models.tokenizer.pad_token_id)
            began = time.perf_counter()
            score_tokens_many([get_estimator(name)], ids, prompt_length, drafts=drafts, proxy=models.proxy,
                              target=models.target, attention_mask=mask, uncertainty_mask=answer_mask,
                              student=models.student, calibrator=models.calibrator, eu_head=models.eu_head,
                              perturbation=perturbation, perturbation_seeds=_seeds(scale).get(name))
            seconds += time.perf_counter() - began
        timing[name] = seconds / len(subset)
        _write_json(path, timing)
    return timing
