"""Fit the `hf_eu_calibrated` regressor of a composite on calibration questions and store it in the composite.

Usage (about 10 minutes on 2 CPU cores for the shipped default):

    python -m trainers.run_calibrator
    python -m trainers.run_calibrator --composite hf_eu/defaults/smollm2-135m-instruct --arith 96 --gsm 16

Calibration questions come from seed `training_seed(500)` = 1500: never an evaluation seed (< 1000) and
not the drafts' training seeds; texts the drafts trained on are dropped. The target answers greedily,
the ground-truth EU is the mutual information of `--num-perturbed` perturbed targets (seeds 0…N-1,
r = 8, σ = 0.1), the features are `hf_eu.estimators.CALIBRATION_FEATURES`, and the fitted calibrator is
written to `<composite>/calibrator/` with `calibration_questions.json` beside the composite's files, so
evaluations can exclude those questions.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from hf_eu import UncertaintyAwareModelForCausalLM
from hf_eu.calibration import CALIBRATOR_FOLDER
from hf_eu.defaults import DEFAULT_COMPOSITE_DIR
from hf_eu.embedded import load_embedded_target
from hf_eu.estimators import perturbed_ensemble_estimator
from hf_eu.perturbation import LowRankGaussianPerturbation
from .calibration import answer_greedily, calibration_features, fit_calibrator, token_values
from .questions import reasoning_gym_questions, training_seed

CALIBRATION_SEED = training_seed(500)
ARITH_TASKS = ("arith_basic", "arith_chain_sum", "arith_products")


def calibration_questions(arith: int, gsm: int, exclude: set[str]) -> list[dict]:
    """`arith` questions split over the three arithmetic presets plus `gsm` gsm_symbolic ones, deduplicated."""
    chosen, seen = [], set(exclude)
    for task, count in [(t, arith // len(ARITH_TASKS)) for t in ARITH_TASKS] + [("gsm_symbolic", gsm)]:
        pool = reasoning_gym_questions(task, 4 * count + 8, seed=CALIBRATION_SEED)
        fresh = [q for q in pool if q["question"] not in seen and not seen.add(q["question"])]
        chosen += fresh[:count]
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--composite", default=DEFAULT_COMPOSITE_DIR, help="composite folder to fit and update")
    parser.add_argument("--arith", type=int, default=96, help="arithmetic calibration questions")
    parser.add_argument("--gsm", type=int, default=16, help="gsm_symbolic calibration questions")
    parser.add_argument("--num-perturbed", type=int, default=16, help="perturbed targets of the ground truth")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    target, tokenizer = load_embedded_target()
    model = UncertaintyAwareModelForCausalLM.from_pretrained(args.composite, target=target)
    trained_path = os.path.join(args.composite, "train_questions.json")
    trained = set(json.load(open(trained_path))) if os.path.isfile(trained_path) else set()
    questions = calibration_questions(args.arith, args.gsm, trained)
    answers = answer_greedily(target, tokenizer, [q["question"] for q in questions],
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    parts = dict(drafts=model.drafts, proxy=model.proxy, target=target, pad_id=tokenizer.pad_token_id,
                 batch_size=args.batch_size)
    truth, _ = token_values(perturbed_ensemble_estimator(args.num_perturbed, "ground_truth"), answers, progress=True,
                            perturbation=LowRankGaussianPerturbation(target), **parts)
    features = calibration_features(answers, **parts)
    info = {"questions": len(questions), "seed": CALIBRATION_SEED, "ground_truth_num_perturbed": args.num_perturbed,
            "perturbation": {"rank": 8, "sigma": 0.1, "seeds": f"0..{args.num_perturbed - 1}"},
            "command": "python -m trainers.run_calibrator " + " ".join(os.sys.argv[1:])}
    model.calibrator = fit_calibrator(np.concatenate(features), np.concatenate(truth), info=info)
    print(json.dumps(model.calibrator.info, indent=2))
    model.calibrator.save(os.path.join(args.composite, CALIBRATOR_FOLDER))
    model.config.has_calibrator = True
    config_path = os.path.join(args.composite, "config.json")
    model.config.to_json_file(config_path + ".tmp", use_diff=True)
    os.replace(config_path + ".tmp", config_path)  # the calibrator is in place before the config promises it
    questions_path = os.path.join(args.composite, "calibration_questions.json")
    with open(questions_path + ".tmp", "w") as handle:
        json.dump([q["question"] for q in questions], handle, indent=0)
    os.replace(questions_path + ".tmp", questions_path)


if __name__ == "__main__":
    main()
