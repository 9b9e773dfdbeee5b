"""Evaluate hf_eu's uncertainty against the ground truth and its peers: error, detection, cost.

Usage:

    python -m benchmarks.run --scale tiny     # random tiny models, < 1 minute: the pipeline end to end (CI)
    python -m benchmarks.run --scale small    # SmolLM2-135M-Instruct + shipped defaults, ~60 min on 2 cores
    python -m benchmarks.run --scale paper --target meta-llama/Llama-3.1-8B-Instruct \\
        --composite path/to/composite --idd-composite path/to/idd --gsm8k openai/gsm8k   # a GPU recipe

Stages, each cached under `--cache` (default `.bench-cache/<scale>`) so an interrupted run continues where
it stopped: questions -> greedy answers (timed) -> per-token values of every estimator and of the ground
truth (N perturbed targets) per batch -> timing of each estimator on the first answers -> metrics.
Writes `benchmarks/results/<scale>/results.json`, `results.md` and plots (`roc.png`,
`eu_vs_ground_truth.png`, `answer_heatmap.png`/`.html`). Protocol: docs/method.md; scales and seeds:
`benchmarks/eval_setup.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np

from benchmarks.common import command, machine
from benchmarks.eval_report import build_results, make_plots, markdown_table
from benchmarks.eval_scoring import (collect_answers, collect_scores, collect_timing, estimator_flops, estimator_names,
                                     forget_estimators, forward_flops)
from benchmarks.eval_answer_risk import (DETECT_ESTIMATORS, fit_detector, plot_answer_risk, risk_records,
                                         save_detector)
from benchmarks.eval_setup import (ARITH_TASKS, CALIB_SEED, DETECT_SEED, EVAL_SEED, SCALES, build_questions,
                                   load_models)
from trainers.questions import reasoning_gym_questions

__all__ = ["main", "run"]


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), required=True, help="tiny (CI), small (CPU), paper (GPU)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/<scale>)")
    parser.add_argument("--cache", default=None, help="stage cache for resuming (default .bench-cache/<scale>)")
    parser.add_argument("--composite", default=None, help="composite folder (default: the shipped SmolLM2 one)")
    parser.add_argument("--idd-composite", default=None, help="composite of the IDD ablation drafts")
    parser.add_argument("--target", default=None, help="target id/folder for --scale paper")
    parser.add_argument("--gsm8k", default=None, help="GSM8K hub id or local file for the gsm set (paper scale)")
    parser.add_argument("--fresh", action="store_true", help="discard the cache and start over")
    parser.add_argument("--only-sets", default=None,
                        help="comma-separated sets to answer and score, nothing else (e.g. 'gsm' in a second process "
                             "beside a run on the others); writes no results")
    parser.add_argument("--from-end", action="store_true",
                        help="score each set's batches last to first: a second process on the same set meets the first "
                             "in the middle (each skips the batches the other has written)")
    parser.add_argument("--no-timing", action="store_true",
                        help="skip the timing stage (answers and scores only; a later run times every estimator at once)")
    parser.add_argument("--fit-detector", action="store_true",
                        help="fit the answer-risk detector on the detect set and save it in the composite (how the "
                             "shipped one was made); without it a composite's own detector is evaluated, if it has one")
    parser.add_argument("--fit-calibrator", action="store_true",
                        help="fit hf_eu_calibrated's regressor on the calibration set and save it in the composite "
                             "(how the shipped one was made); without it a composite lacking one skips that estimator")
    parser.add_argument("--rescore", default=None,
                        help="comma-separated estimators whose cached values and timings are dropped first, so they "
                             "are scored and timed again (after a part they read changed); the rest stays cached. "
                             "'timing' drops every timing, so all estimators are timed again side by side")
    return parser.parse_args(argv)


def _fit_calibrator(models, calib, scale, save: bool) -> None:
    """Fit `hf_eu_calibrated`'s regressor on the calibration set (disjoint from every evaluated question);
    with `save`, store it in the composite (atomically) with the questions it saw."""
    from hf_eu.calibration import CALIBRATOR_FOLDER
    from trainers.calibration import fit_calibrator

    columns = [np.concatenate(calib["scores"][n]) for n in ("hf_eu_variance", "hf_eu_bias", "proxy_entropy", "entropy")]
    info = {"fitted_on": f"benchmarks.run --scale {scale.name} calibration set", "questions": len(calib["answers"]),
            "question_seed": CALIB_SEED, "ground_truth_num_perturbed": scale.num_perturbed,
            "command": command("benchmarks.run")}
    models.calibrator = fit_calibrator(np.stack(columns, -1), np.concatenate(calib["scores"]["ground_truth"]),
                                       hidden_layer_sizes=(4,) if scale.name == "tiny" else (16,), info=info)
    if save:
        models.calibrator.save(os.path.join(models.composite, CALIBRATOR_FOLDER))
        config_path = os.path.join(models.composite, "config.json")
        config = json.load(open(config_path))
        config["has_calibrator"] = True
        for path, payload in ((config_path, config), (os.path.join(models.composite, "calibration_questions.json"),
                                                      [a["question"] for a in calib["answers"]])):
            with open(path + ".tmp", "w") as handle:
                json.dump(payload, handle, indent=2)
            os.replace(path + ".tmp", path)
        print(f"calibrator fitted on {len(calib['answers'])} calibration questions, saved in {models.composite}")


def _answer_risk(models, data: dict, evaluated: dict, scale, default: str, out: str, fit: bool) -> dict:
    """Fit (with `fit`) the answer-risk detector on the detect set, then measure it on every evaluated set
    that has both right and wrong answers; plots go to `out`."""
    detector, confidence = models.detector, None
    detect = data["detect"]
    weights, weighting = _detect_weights(models, data, scale)
    info = {"fitted_on": f"benchmarks.run --scale {scale.name} detect set ({len(detect['answers'])} arithmetic "
                         f"questions, seed {DETECT_SEED}, disjoint from every evaluated question), weighted to the "
                         "arith set's draw (benchmarks/detect_weights.py)",
            "weighting": weighting, "command": command("benchmarks.run")}
    if min(detect["wrong"].mean(), 1 - detect["wrong"].mean()) > 0:
        fitted, confidence = fit_detector(detect, default, info, weights)
        if fit:
            detector = fitted
            if scale.name != "tiny":
                save_detector(fitted, models.composite, [a["question"] for a in detect["answers"]])
                print(f"answer-risk detector fitted on {len(detect['answers'])} detect questions, saved in "
                      f"{models.composite}")
    if detector is None or detector.estimator != default:
        return {"note": "no detector for the default estimator: run with --fit-detector"}
    records = {}
    for set_name, set_data in evaluated.items():
        if set_data["wrong"].min() != set_data["wrong"].max():
            records[set_name] = risk_records(set_data, detector, confidence, scale.bootstrap, scale.cv_seeds)
            plot_answer_risk(records[set_name], os.path.join(out, f"answer_risk_{set_name}"))
    return records


def _detect_weights(models, data: dict, scale) -> tuple[np.ndarray, dict]:
    """Weights for the detect answers as if they had been drawn like `arith`'s, before the texts of every other
    set (and those the composite trained on) were taken out of their draw (`benchmarks.detect_weights`)."""
    from benchmarks.detect_weights import exclusion_weights

    removed = set(models.excluded_questions) | set(models.calibrator_questions)
    removed |= {a["question"] for name, set_data in data.items() if name != "detect" for a in set_data["answers"]}
    tasks = [a["task"] for a in data["arith"]["answers"]] if "arith" in data else list(ARITH_TASKS)
    shares = {task: tasks.count(task) / len(tasks) for task in set(tasks)}
    return exclusion_weights(data["detect"]["answers"], removed, shares, reasoning_gym_questions,
                             stream=scale.detect_stream)


def _costs(models, names, timings, scale) -> dict:
    target_flops = forward_flops(models.target)
    flops = {n: round(estimator_flops(models, n, scale) / target_flops, 4) for n in names}
    flops["ground_truth"] = float(scale.num_perturbed)
    times = {}
    for n in names + ["ground_truth"]:
        per_set = [t[n] / t["generation"] for t in timings.values() if n in t]
        times[n] = round(float(np.mean(per_set)), 4) if per_set else None
    return {"flops_ratio": flops, "time_ratio": times}


def run(argv=None) -> dict:
    """Run the evaluation described by the command-line arguments `argv`; returns the results."""
    args = _parse(argv)
    scale = SCALES[args.scale]
    out = args.out or os.path.join("benchmarks", "results", scale.name)
    cache = args.cache or os.path.join(".bench-cache", scale.name)
    if args.fresh:
        shutil.rmtree(cache, ignore_errors=True)
    if args.rescore:
        forget_estimators(cache, args.rescore.split(","))
    models = load_models(scale, args.composite, args.idd_composite, args.target)
    questions = build_questions(scale, models.excluded_questions, args.gsm8k, models.calibrator_questions)
    fit_calibrator = scale.name == "tiny" or args.fit_calibrator  # tiny models ship none: always fit one
    names = estimator_names(models)
    if fit_calibrator and "hf_eu_calibrated" not in names:
        names.append("hf_eu_calibrated")  # fitted below on the calibration set

    default = models.default_estimator if models.default_estimator in names else "hf_eu"
    data, timings = {}, {}
    for set_name in ["calib"] + [s for s in questions if s != "calib"]:
        if args.only_sets and set_name not in args.only_sets.split(","):
            continue
        folder = os.path.join(cache, set_name)
        answers = collect_answers(models, questions[set_name], scale, set_name, folder)
        if set_name == "detect":  # the answer-risk detector's fitting answers: no ground truth, one target pass
            scores = collect_scores(models, answers, scale, folder, list(dict.fromkeys([default, *DETECT_ESTIMATORS])),
                                    ground_truth=False)
        else:
            set_names = [n for n in names if n != "hf_eu_calibrated" or (set_name != "calib" or not fit_calibrator)]
            scores = collect_scores(models, answers, scale, folder, set_names, from_end=args.from_end)
        if set_name == "calib" and fit_calibrator:
            _fit_calibrator(models, {"answers": answers, "scores": scores}, scale, save=scale.name != "tiny")
        wrong = np.array([not a["correct"] for a in answers], dtype=float)
        if scale.name == "tiny":  # random models are never right: alternate labels so detection code runs (plumbing only)
            wrong = np.arange(len(answers)) % 2.0
        data[set_name] = {"answers": answers, "scores": scores, "wrong": wrong}
        if set_name not in ("calib", "detect") and not args.no_timing:
            timings[set_name] = collect_timing(models, answers, scale, folder, names)

    if args.only_sets:
        print(f"answered and scored {sorted(data)}; run without --only-sets for the results")
        return {}
    evaluated = {k: v for k, v in data.items() if k not in ("calib", "detect")}
    results = {"scale": scale.name, "command": command("benchmarks.run"), "machine": machine(),
               "composite": models.composite,
               "n_questions": {k: len(v["answers"]) for k, v in data.items()},
               "n_tokens": {k: int(sum(len(a["answer_ids"]) for a in v["answers"])) for k, v in data.items()},
               "target_accuracy": {k: round(float(1 - v["wrong"].mean()), 4) for k, v in data.items()},
               "seeds": {"evaluation_questions": EVAL_SEED, "calibration_questions": CALIB_SEED,
                         "drafts_and_proxy_training_questions": "1000+k",
                         "calibrator_questions": "the calib set (with --fit-calibrator), disjoint from evaluated ones",
                         "ground_truth_perturbations": f"0..{scale.num_perturbed - 1}",
                         "tokur_perturbations": "10000..10007 (M=4: the first four)"},
               "ground_truth": {"num_perturbed": scale.num_perturbed, **scale.perturbation},
               "max_new_tokens": scale.max_new_tokens}
    costs = _costs(models, names, timings, scale)
    results.update(build_results(evaluated, data["calib"]["scores"], names, costs, scale.bootstrap, scale.cv_seeds,
                                 default=default))
    os.makedirs(out, exist_ok=True)
    if "detect" in data:
        results["answer_risk"] = _answer_risk(models, data, evaluated, scale, default, out,
                                              fit=args.fit_detector or scale.name == "tiny")
    with open(os.path.join(out, "questions.json"), "w") as handle:  # the evaluated texts: nothing may train on them
        json.dump({name: [q["question"] for q in qs] for name, qs in questions.items()}, handle, indent=1)
    with open(os.path.join(out, "results.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    with open(os.path.join(out, "results.md"), "w") as handle:
        handle.write(markdown_table(results))
    make_plots(evaluated, out, models.tokenizer, names, costs["time_ratio"], default=default)
    print(markdown_table(results))
    return results


def main() -> None:
    run()


if __name__ == "__main__":
    main()
