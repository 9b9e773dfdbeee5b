"""Training data of the distilled EU head: target answers, their 16-copy ground-truth EU, and the head's features.

Usage (the shipped head's data; about 25 minutes on 2 CPU cores, resumable):

    python -m trainers.eu_head_data --output_dir .train-defaults/eu-head-data \\
        --exclude_questions benchmarks/results/small/questions.json

Stages, each resumable (a rerun skips every finished batch; files are written aside and renamed):
1. questions: reasoning-gym presets from `question_seed` (a training seed, ≥ 1000), every text of
   `exclude_questions` (the evaluation's sets) removed, written to `questions.json`;
2. the target's greedy chat answers, `answers.json`;
3. per batch of answers, `ground_truth-NNNNN.npz`: the mutual information of `num_perturbed` low-rank Gaussian
   perturbations of the target (the ground truth of docs/method.md §2, on seeds `perturbation_seed_start …`, apart from the
   evaluation's 0-15 and TokUR's 10000+), one value per answer token;
4. per batch, `features-NNNNN.npz`: the head's inputs at the position predicting each answer token
   (`hf_eu.eu_features`), from one teacher-forced target pass (`--stage features` does only this, for the
   batches whose ground truth is done, so it can run beside a `--stage ground_truth` process).
`settings.json` records what the data depends on (target fingerprint, questions, perturbation); a rerun with
other settings stops before anything is written.

Perturbation seeds: by default every batch uses the same `num_perturbed` seeds. With `--seeds_per_batch` each batch
draws its own block (`batch_seeds`), so the labels hold what all perturbations share rather than one set's quirks.
`--answers_from FOLDER` labels the answers of another folder a second time (its questions, answers and features are
copied, only the ground truth is computed; the question and answer settings must be that folder's), e.g. the
shipped head's second labels of its first folder, 4 fresh copies per batch:

    python -m trainers.eu_head_data --output_dir .train-defaults/eu-head-data-varied4 \\
        --answers_from .train-defaults/eu-head-data --questions_per_task \\
        "gsm_symbolic=72,arith_chain_sum=60,arith_products=60,arith_basic=60,arith_add_mul=30" \\
        --num_perturbed 4 --seeds_per_batch --perturbation_seed_start 30000

`load_data` puts labels made with other copy counts on the 16-copy scale (`copies_scale`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from hf_eu.fingerprint import model_fingerprint

__all__ = ["EUHeadDataArguments", "batch_seeds", "copies_scale", "build_questions", "build_data", "load_data",
           "proxy_entropy_column"]


@dataclass
class EUHeadDataArguments:
    """Arguments of `python -m trainers.eu_head_data`."""

    output_dir: str = field(metadata={"help": "Folder of the data (resumed when it exists)."})
    target: str = field(default="embedded", metadata={"help": "Target id or folder; 'embedded' = SmolLM2-135M."})
    exclude_questions: list[str] = field(default_factory=list, metadata={
        "help": "JSON files of question texts never to use (the evaluation's sets): a list, or {set: [texts]}."})
    questions_per_task: str = field(default="gsm_symbolic=220,arith_chain_sum=120,arith_products=120,"
                                            "arith_basic=120,arith_add_mul=60",
                                    metadata={"help": "preset=count,... (trainers.questions.REASONING_GYM_PRESETS)."})
    question_seed: int = field(default=2000, metadata={"help": "reasoning-gym seed (a training seed, ≥ 1000)."})
    max_new_tokens: int = field(default=128, metadata={"help": "Longest answer."})
    batch_size: int = field(default=8, metadata={"help": "Answers per generation and scoring batch."})
    num_perturbed: int = field(default=16, metadata={"help": "Perturbed copies of the ground truth."})
    perturbation_seed_start: int = field(default=20000, metadata={"help": "First perturbation seed (≥ 20000)."})
    seeds_per_batch: bool = field(default=False, metadata={
        "help": "Give each batch its own perturbations (batch b: seeds start + b·num_perturbed …) instead of one "
                "set for all: labels then average over perturbations, not one set's quirks (see batch_seeds)."})
    rank: int = field(default=8, metadata={"help": "Perturbation rank r."})
    sigma: float = field(default=0.1, metadata={"help": "Perturbation scale σ."})
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"],
                                      metadata={"help": "Perturbed layers."})
    answers_from: str | None = field(default=None, metadata={
        "help": "A folder made with the same questions, target and answer settings whose questions, answers and "
                "features to reuse (the answers are greedy, hence the same), so that only this folder's ground truth "
                "is computed: a second set of labels on the same answers (other seeds or copies)."})
    stage: str = field(default="all", metadata={"help": "'all', 'ground_truth' (stages 1-3) or 'features' (stage 4; "
                                                           "1-3 must be complete)."})

    def __post_init__(self):
        if self.question_seed < 1000:
            raise ValueError(f"`question_seed` must be a training seed (≥ 1000), got {self.question_seed}.")
        if self.perturbation_seed_start < 20000:
            raise ValueError(f"`perturbation_seed_start` must be ≥ 20000 (the evaluation uses 0-15, TokUR 10000+), "
                             f"got {self.perturbation_seed_start}.")
        if self.stage not in ("all", "ground_truth", "features"):
            raise ValueError(f"`stage` must be 'all', 'ground_truth' or 'features', got {self.stage!r}.")
        if self.num_perturbed < 2:
            raise ValueError(f"`num_perturbed` must be ≥ 2, got {self.num_perturbed}.")


def _plan(spec: str) -> list[tuple[str, int]]:
    plan = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        task, _, count = part.partition("=")
        if not count.isdigit():
            raise ValueError(f"`questions_per_task` entries look like 'preset=count', got {part!r}.")
        plan.append((task, int(count)))
    return plan


def _excluded(paths: list[str]) -> set[str]:
    texts: set[str] = set()
    for path in paths:
        payload = json.load(open(path))
        for group in (payload.values() if isinstance(payload, dict) else [payload]):
            texts |= {q["question"] if isinstance(q, dict) else q for q in group}
    return texts


def build_questions(args: EUHeadDataArguments) -> list[dict]:
    """The questions of `args`: each preset's count, no text repeated or in `exclude_questions`."""
    from .questions import reasoning_gym_questions

    seen = _excluded(args.exclude_questions)
    chosen = []
    for task, count in _plan(args.questions_per_task):
        pool = reasoning_gym_questions(task, 6 * count + 16, seed=args.question_seed)
        chosen += [q for q in pool if q["question"] not in seen and not seen.add(q["question"])][:count]
    return chosen


def _write(path: str, write) -> None:
    temporary = path + ".tmp" + (".npz" if path.endswith(".npz") else "")
    write(temporary)
    os.replace(temporary, path)


def _write_json(path: str, payload) -> None:
    def write(temporary):
        with open(temporary, "w") as handle:
            json.dump(payload, handle, indent=1)
    _write(path, write)


_NOT_RECORDED = ("output_dir", "stage", "exclude_questions", "answers_from")  # they do not change the data
_PERTURBATION_KEYS = ("num_perturbed", "perturbation_seed_start", "seeds_per_batch", "rank", "sigma", "target_modules")
_ADDED_LATER = {"seeds_per_batch": False}  # settings added after data was made with them at these values


def _stored_settings(path: str) -> dict:
    """A folder's `settings.json`; a setting added after the folder was made reads as the default it was made with."""
    return {**_ADDED_LATER, **json.load(open(path))}


def _check_settings(args: EUHeadDataArguments, fingerprint: str) -> None:
    settings = {k: v for k, v in asdict(args).items() if k not in _NOT_RECORDED}
    settings["target_fingerprint"] = fingerprint
    path = os.path.join(args.output_dir, "settings.json")
    if os.path.isfile(path):
        stored = _stored_settings(path)
        if stored != settings:
            changed = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
            raise ValueError(f"{args.output_dir} holds data made with other settings ({changed}); pass another "
                             "`output_dir`, or the settings it was made with.")
    else:
        os.makedirs(args.output_dir, exist_ok=True)
        _write_json(path, settings)


def _reuse_answers(args: EUHeadDataArguments) -> None:
    """Copy `answers_from`'s questions, answers and features into `output_dir` (each file only where it is absent,
    written aside and renamed), after checking that both folders share everything but the perturbation."""
    import shutil

    source = args.answers_from
    path = os.path.join(source, "settings.json")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(source, "answers.json")):
        raise ValueError(f"`answers_from` must be a folder written by trainers.eu_head_data with its answers; "
                         f"{source!r} has no settings.json or answers.json.")
    theirs = _stored_settings(path)
    ours = json.load(open(os.path.join(args.output_dir, "settings.json")))
    differ = sorted(k for k in set(theirs) | set(ours) if k not in _PERTURBATION_KEYS and theirs.get(k) != ours.get(k))
    if differ:
        raise ValueError(f"`answers_from` {source!r} was made with other {differ}; its answers are not this folder's.")
    names = ["questions.json", "answers.json"] + sorted(n for n in os.listdir(source)
                                                          if n.startswith("features-") and n.endswith(".npz"))
    for name in names:
        if not os.path.isfile(os.path.join(args.output_dir, name)):
            _write(os.path.join(args.output_dir, name), lambda temporary: shutil.copyfile(os.path.join(source, name),
                                                                                          temporary))


def _answers(args, target, tokenizer, questions) -> list[dict]:
    from .calibration import answer_greedily

    path = os.path.join(args.output_dir, "answers.json")
    if os.path.isfile(path):
        return json.load(open(path))
    rows = []
    for answer, question in zip(answer_greedily(target, tokenizer, [q["question"] for q in questions],
                                                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size),
                                questions):
        rows.append({"question": question["question"], "task": question.get("task"), "text": answer["text"],
                     "prompt_ids": answer["prompt_ids"].tolist(), "answer_ids": answer["answer_ids"].tolist()})
    _write_json(path, rows)
    return rows


def _batch(rows: list[dict], pad_id: int):
    from .calibration import Answer, _answer_batch

    answers = [Answer(prompt_ids=torch.tensor(r["prompt_ids"]), answer_ids=torch.tensor(r["answer_ids"], dtype=torch.long))
               for r in rows]
    return _answer_batch(answers, pad_id)  # ids, mask (B, P + T), P, answer mask (B, T)


def batch_seeds(args: EUHeadDataArguments, number: int) -> list[int]:
    """The perturbation seeds of batch `number`: the same `num_perturbed` seeds from `perturbation_seed_start` for
    every batch, or with `seeds_per_batch` batch `number`'s own block of them.

    Why blocks: with one fixed set of 16 perturbations, a token's mutual information also measures how that set's
    particular directions happen to hit it. A head fitted to one set learns those quirks, and they do not carry
    over to the evaluation's set (seeds 0-15): measured on the `arith` answers, a regressor fitted to TokUR's 8
    seeds reached Spearman 0.91 against TokUR but 0.86 against the ground truth. Fresh seeds per batch leave only
    what every set shares.
    """
    first = args.perturbation_seed_start + (number * args.num_perturbed if args.seeds_per_batch else 0)
    return list(range(first, first + args.num_perturbed))


def _ground_truth(args, target, batch_rows, pad_id, perturbation, number: int) -> np.ndarray:
    from hf_eu.estimators import perturbed_ensemble_estimator
    from hf_eu.scoring import score_tokens_many

    ids, mask, prompt_length, answer_mask = _batch(batch_rows, pad_id)
    estimator = perturbed_ensemble_estimator(args.num_perturbed, "ground_truth")
    seeds = batch_seeds(args, number)
    out = score_tokens_many([estimator], ids, prompt_length, drafts=[], proxy=None, target=target, attention_mask=mask,
                            uncertainty_mask=answer_mask, perturbation=perturbation, perturbation_seeds=seeds,
                            max_chunk_elements=2**28)["ground_truth"]
    return out.epistemic_uncertainty[answer_mask].double().numpy()  # (sum T,)


def _features(target, batch_rows, pad_id) -> dict[str, np.ndarray]:
    from hf_eu.eu_features import teacher_forced_features

    ids, mask, prompt_length, answer_mask = _batch(batch_rows, pad_id)
    features = teacher_forced_features(target, ids, prompt_length, attention_mask=mask)  # (B, T, ·)
    return {"values": features.values[answer_mask].numpy(),  # (sum T, F)
            "topk_ids": features.topk_ids[answer_mask].int().numpy(),  # (sum T, k)
            "topk_logps": features.topk_logps[answer_mask].numpy()}  # (sum T, k)


def build_data(args: EUHeadDataArguments) -> str:
    """Run the stages of the module docstring; returns `args.output_dir`."""
    from hf_eu.perturbation import LowRankGaussianPerturbation
    from .script_utils import load_target
    from transformers import AutoTokenizer

    target = load_target(args.target)
    tokenizer = AutoTokenizer.from_pretrained(target.name_or_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    _check_settings(args, model_fingerprint(target))
    if args.answers_from:
        _reuse_answers(args)
    questions_path = os.path.join(args.output_dir, "questions.json")
    if not os.path.isfile(questions_path):
        _write_json(questions_path, build_questions(args))
    rows = _answers(args, target, tokenizer, json.load(open(questions_path)))
    perturbation = LowRankGaussianPerturbation(target, rank=args.rank, sigma=args.sigma,
                                               target_modules=args.target_modules)
    starts = list(range(0, len(rows), args.batch_size))
    # batches in a fixed interleaved order, so the finished ones of an interrupted run mix every task
    order = np.random.default_rng(0).permutation(len(starts)).tolist()
    for number in tqdm(order, desc="eu head data"):
        start = starts[number]
        batch_rows = [r for r in rows[start:start + args.batch_size] if r["answer_ids"]]
        if not batch_rows:
            continue
        gt_path = os.path.join(args.output_dir, f"ground_truth-{number:05d}.npz")
        if not os.path.isfile(gt_path):
            if args.stage == "features":  # its ground truth is not done yet (another process may be on it)
                continue
            values = _ground_truth(args, target, batch_rows, pad_id, perturbation, number)
            _write(gt_path, lambda p: np.savez(p, ground_truth=values))
        features_path = os.path.join(args.output_dir, f"features-{number:05d}.npz")
        if args.stage != "ground_truth" and not os.path.isfile(features_path):
            arrays = _features(target, batch_rows, pad_id)
            _write(features_path, lambda p: np.savez(p, **arrays))
    return args.output_dir


def copies_scale(stored_copies: int, ground_truth_copies: int) -> float:
    """Factor from the mutual information of `stored_copies` perturbed copies to that of `ground_truth_copies`.

    To second order in the perturbation the MI (JSD) of M members is ½·(1/M)·Σ_m (δ_m − δ̄)ᵀ F (δ_m − δ̄), with
    δ_m a member's logit change and F = diag(p) − ppᵀ; its expectation is ½·(1 − 1/M)·tr(F Σ), so the factor is
    (1 − 1/ground_truth_copies) / (1 − 1/stored_copies).
    """
    if min(stored_copies, ground_truth_copies) < 2:
        raise ValueError(f"Mutual information needs ≥ 2 copies, got {stored_copies} and {ground_truth_copies}.")
    return (1.0 - 1.0 / ground_truth_copies) / (1.0 - 1.0 / stored_copies)


def load_data(folder: str, allow_partial: bool = False, ground_truth_copies: int | None = 16) -> dict[str, np.ndarray]:
    """`{"values": (N, F), "topk_ids": (N, k), "topk_logps": (N, k), "ground_truth": (N,), "answer_index": (N,)}`
    over every batch of `folder` (with `allow_partial`, over the finished ones: an interrupted run's data).

    `ground_truth_copies`: the labels are put on the scale of the MI of this many copies (the evaluation's ground
    truth has 16) by `copies_scale`, so that folders made with fewer copies (cheaper, e.g. 4 with `seeds_per_batch`)
    train a head of the same scale; None keeps them as stored. A batch whose features and ground truth disagree in
    length, or that lacks one of them, raises.
    """
    rows = json.load(open(os.path.join(folder, "answers.json")))
    settings = json.load(open(os.path.join(folder, "settings.json")))
    scale = 1.0 if ground_truth_copies is None else copies_scale(settings["num_perturbed"], ground_truth_copies)
    features, truth, index = {"values": [], "topk_ids": [], "topk_logps": []}, [], []
    for number, start in enumerate(range(0, len(rows), settings["batch_size"])):
        batch = [i for i in range(start, min(start + settings["batch_size"], len(rows))) if rows[i]["answer_ids"]]
        if not batch:
            continue
        paths = [os.path.join(folder, f"{kind}-{number:05d}.npz") for kind in ("features", "ground_truth")]
        if not all(os.path.isfile(p) for p in paths):
            if allow_partial:
                continue
            raise ValueError(f"Batch {number} of {folder} is unfinished ({paths}); rerun trainers.eu_head_data.")
        batch_features, batch_truth = dict(np.load(paths[0])), np.load(paths[1])["ground_truth"]
        expected = sum(len(rows[i]["answer_ids"]) for i in batch)
        if any(len(v) != expected for v in batch_features.values()) or len(batch_truth) != expected:
            raise ValueError(f"Batch {number} of {folder} holds {len(batch_features['values'])} feature rows and "
                             f"{len(batch_truth)} ground-truth values for {expected} answer tokens; delete both files "
                             "and rerun.")
        for name in features:
            features[name].append(batch_features[name])
        truth.append(batch_truth * scale)
        index.append(np.concatenate([np.full(len(rows[i]["answer_ids"]), i) for i in batch]))
    return {**{name: np.concatenate(parts) for name, parts in features.items()},
            "ground_truth": np.concatenate(truth), "answer_index": np.concatenate(index)}


def proxy_entropy_column(folder: str, target, proxy, answer_index: np.ndarray) -> np.ndarray:
    """`(N,)` the OSD proxy's predictive entropy (nats) at the position predicting each answer token of `folder`, in
    the order of `load_data`'s `answer_index`: the extra input of a `proxy_head` (estimator `eu_head_proxy`).

    Computed by the library's own `proxy_entropy` estimator (one teacher-forced proxy pass per answer) and cached
    in `folder/proxy_entropy.npz`, keyed by the proxy's fingerprint (another proxy recomputes it).
    """
    from hf_eu import get_estimator, score_tokens_many

    rows = json.load(open(os.path.join(folder, "answers.json")))
    cache, fingerprint = os.path.join(folder, "proxy_entropy.npz"), model_fingerprint(proxy)
    stored = dict(np.load(cache)) if os.path.isfile(cache) else {}
    if str(stored.get("fingerprint", "")) != fingerprint:
        stored = {"fingerprint": np.array(fingerprint)}
    wanted = [int(i) for i in np.unique(answer_index) if f"row_{int(i)}" not in stored]
    for index in tqdm(wanted, desc="proxy entropy", disable=not wanted):
        row = rows[index]
        ids = torch.tensor([row["prompt_ids"] + row["answer_ids"]])
        with torch.no_grad():
            out = score_tokens_many([get_estimator("proxy_entropy")], ids, len(row["prompt_ids"]), drafts=[],
                                    proxy=proxy, target=target)
        stored[f"row_{index}"] = out["proxy_entropy"].epistemic_uncertainty[0].double().numpy()  # (T,)
    if wanted:
        _write(cache, lambda path: np.savez(path, **stored))
    starts = np.r_[0, np.nonzero(np.diff(answer_index))[0] + 1]  # each answer's rows are contiguous
    return np.concatenate([stored[f"row_{int(answer_index[s])}"] for s in starts]).astype(np.float32)


def main(argv=None) -> None:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(EUHeadDataArguments).parse_args_into_dataclasses(argv)
    print(build_data(args))


if __name__ == "__main__":
    main()
