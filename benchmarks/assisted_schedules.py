"""Time assisted decoding with the best shipped draft under several speculation schedules.

Usage (about 5 minutes on 2 CPU cores):

    python -m benchmarks.assisted_schedules

For 6 held-out questions (48 greedy tokens each, batch 1) it times plain `generate` and `generate`
with the draft as `assistant_model`: transformers' default heuristic schedule, and constant schedules
of 1, 2 and 3 speculative tokens, with the draft in float32 and in bfloat16; the heuristic schedule without
transformers' adaptive confidence threshold (which fits a scikit-learn ROC curve after every step); and what a
user of the wrapper runs: the draft as the composite holds it (a PEFT model, not merged) through
`model.generate(assistant_draft=...)`, without and with `return_dict_in_generate=True` (EU of the default
estimator: assisted decoding falls back to one teacher-forced target pass), beside the wrapper's plain
`generate` with EU. Writes `benchmarks/results/assisted_schedules.json` (seconds per variant, speedup = plain /
variant, all in one run with the same thread settings).

`python -m benchmarks.assisted_schedules --profile` instead profiles one 32-token answer of
`model.generate(assistant_draft=..., return_dict_in_generate=True)` with `cProfile` and writes where its time goes
(cumulative seconds and shares of the call) to `benchmarks/results/assisted_profile.json`.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from benchmarks.common import command, machine, write_result
from benchmarks.training import held_out_questions
from hf_eu import UncertaintyAwareModelForCausalLM
from hf_eu.defaults import DEFAULT_COMPOSITE_DIR
from hf_eu.embedded import load_embedded_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", type=int, default=2, help="draft index (the best by greedy agreement)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/assisted_schedules.json, or "
                                                    "assisted_profile.json with --profile")
    parser.add_argument("--profile", action="store_true", help="profile one answer instead of timing the variants")
    args = parser.parse_args()

    target, tokenizer = load_embedded_target()
    model = UncertaintyAwareModelForCausalLM.from_pretrained(DEFAULT_COMPOSITE_DIR, target=target)
    draft = copy.deepcopy(model.drafts[args.draft]).merge_and_unload()  # the composite keeps its PEFT draft
    drafts = {"float32": draft, "bfloat16": copy.deepcopy(draft).to(torch.bfloat16)}
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
               for q in held_out_questions(16, DEFAULT_COMPOSITE_DIR)[:6]]

    def seconds(wrapper: bool = False, **kwargs) -> float:
        start = time.perf_counter()
        for prompt in prompts:
            (model if wrapper else target).generate(input_ids=prompt, max_new_tokens=48, do_sample=False, **kwargs)
        return round(time.perf_counter() - start, 2)

    if args.profile:
        return _profile(model, prompts[0], args)
    seconds()  # warm-up
    variants = {"plain": {}}
    for dtype, assistant in drafts.items():
        variants[f"{dtype} heuristic"] = {"assistant_model": assistant}
        for n in (1, 2, 3):
            variants[f"{dtype} constant {n}"] = {"assistant_model": assistant, "num_assistant_tokens": n,
                                                 "num_assistant_tokens_schedule": "constant"}
    no_threshold = copy.deepcopy(draft)
    no_threshold.generation_config.assistant_confidence_threshold = 0.0  # 0 turns the adaptive threshold off
    variants["float32 heuristic, no confidence threshold"] = {"assistant_model": no_threshold}
    variants["peft draft heuristic"] = {"assistant_model": model.drafts[args.draft]}
    variants["wrapper assistant_draft"] = {"wrapper": True, "assistant_draft": args.draft}
    variants["wrapper assistant_draft + EU"] = {"wrapper": True, "assistant_draft": args.draft,
                                                "return_dict_in_generate": True}
    variants["wrapper + EU, no assistant"] = {"wrapper": True, "return_dict_in_generate": True}
    timings = {name: seconds(**kwargs) for name, kwargs in variants.items()}
    plain = timings["plain"]
    write_result({"seconds": timings, "speedup": {k: round(plain / v, 3) for k, v in timings.items()},
                  "estimator": model.config.estimator, "draft": args.draft, "questions": len(prompts), "max_new_tokens": 48,
                  "command": command("benchmarks.assisted_schedules"), "machine": machine()},
                 args.out or "benchmarks/results/assisted_schedules.json")


# function name in the profile -> what it is (cumulative time, shares of the whole call)
_PARTS = {"_assisted_decoding": "assisted decoding (transformers)", "get_candidates": "draft candidates",
          "update_candidate_strategy": "schedule and confidence-threshold update (scikit-learn ROC)",
          "_score_generated": "EU scoring after decoding (score_tokens)",
          "score_features_pass": "EU scoring after decoding (one teacher-forced feature pass)",
          "_answer_risk": "answer risk after decoding (incl. its own pass when features are missing)"}


def _profile(model, prompt, args) -> None:
    import cProfile
    import pstats

    call = lambda: model.generate(input_ids=prompt, max_new_tokens=32, do_sample=False,  # noqa: E731
                                  assistant_draft=args.draft, return_dict_in_generate=True)
    call()  # warm-up
    profiler = cProfile.Profile()
    profiler.runcall(call)
    stats = pstats.Stats(profiler).stats  # {(file, line, function): (calls, primitive, tottime, cumtime, callers)}
    total = max(entry[3] for key, entry in stats.items() if key[2] == "generate" and "hf_eu" in key[0])
    seconds = {}
    for (file, _, function), entry in stats.items():
        if function in _PARTS and ("hf_eu" in file or "transformers" in file):
            seconds[_PARTS[function]] = round(seconds.get(_PARTS[function], 0.0) + entry[3], 3)
    write_result({"total_seconds": round(total, 3), "seconds": seconds,
                  "share": {k: round(v / total, 3) for k, v in seconds.items()}, "draft": args.draft,
                  "max_new_tokens": 32, "estimator": model.config.estimator,
                  "command": command("benchmarks.assisted_schedules"), "machine": machine()},
                 args.out or "benchmarks/results/assisted_profile.json")


if __name__ == "__main__":
    main()
