"""Time assisted decoding with the best shipped draft under several speculation schedules.

Usage (about 5 minutes on 2 CPU cores):

    python -m benchmarks.assisted_schedules

For 6 held-out questions (48 greedy tokens each, batch 1) it times plain `generate` and `generate`
with the draft as `assistant_model`: transformers' default heuristic schedule, and constant schedules
of 1, 2 and 3 speculative tokens, with the draft in float32 and in bfloat16. Writes
`benchmarks/results/assisted_schedules.json` (seconds per variant, speedup = plain / variant).
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
    parser.add_argument("--out", default="benchmarks/results/assisted_schedules.json")
    args = parser.parse_args()

    target, tokenizer = load_embedded_target()
    model = UncertaintyAwareModelForCausalLM.from_pretrained(DEFAULT_COMPOSITE_DIR, target=target)
    draft = model.drafts[args.draft].merge_and_unload()
    drafts = {"float32": draft, "bfloat16": copy.deepcopy(draft).to(torch.bfloat16)}
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
               for q in held_out_questions(16, DEFAULT_COMPOSITE_DIR)[:6]]

    def seconds(**kwargs) -> float:
        start = time.perf_counter()
        for prompt in prompts:
            target.generate(input_ids=prompt, max_new_tokens=48, do_sample=False, **kwargs)
        return round(time.perf_counter() - start, 2)

    seconds()  # warm-up
    variants = {"plain": {}}
    for dtype, assistant in drafts.items():
        variants[f"{dtype} heuristic"] = {"assistant_model": assistant}
        for n in (1, 2, 3):
            variants[f"{dtype} constant {n}"] = {"assistant_model": assistant, "num_assistant_tokens": n,
                                                 "num_assistant_tokens_schedule": "constant"}
    timings = {name: seconds(**kwargs) for name, kwargs in variants.items()}
    plain = timings["plain"]
    write_result({"seconds": timings, "speedup": {k: round(plain / v, 3) for k, v in timings.items()},
                  "draft": args.draft, "questions": len(prompts), "max_new_tokens": 48,
                  "command": command("benchmarks.assisted_schedules"), "machine": machine()}, args.out)


if __name__ == "__main__":
    main()
