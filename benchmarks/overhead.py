"""Wall-time overhead of `generate` with EU over the target's plain `generate`, per estimator, and scoring memory.

Usage (what `make bench-overhead` runs; about 15 minutes on 2 CPU cores):

    python -m benchmarks.overhead
    python -m benchmarks.overhead --repeats 3 --max-new-tokens 64 --estimators eu_head,hf_eu,entropy

On SmolLM2-135M-Instruct (the embedded target) with the shipped default composite (`hf_eu/defaults/`:
3 LoRA drafts on 4 target layers, a full-depth LoRA proxy, calibrator, Gaussian student, EU head), it
times, side by side in one run (each estimator's run right after a plain run), `target.generate(...)` and
`model.generate(..., estimator=name, return_dict_in_generate=True)` for every estimator of the evaluation
table (`hf_eu_idd` on the IDD composite's drafts), at batch 1 and batch 8 with the same greedy arguments
(min = max new tokens, so every run produces the same number of tokens); each ratio is the median EU
time over the median of its paired plain times. An estimator reading only the target's features (`eu_head`) is computed
from the decoding passes themselves; every other one adds a teacher-forced pass of the models it reads.
It then measures the peak extra resident memory of scoring a batch of 8 at two answer lengths.
Writes `ratio_batch1` and `ratio_batch8` (the composite's default estimator), `ratios` (every estimator),
`peak_extra_memory_mb`, `command`, `machine` and the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import command, machine, write_result
from benchmarks.memory_probe import peak_extra_memory_mb
from hf_eu import UncertaintyAwareModelForCausalLM
from hf_eu.defaults import DEFAULT_COMPOSITE_DIR, IDD_COMPOSITE_DIR, has_trained_defaults
from hf_eu.embedded import load_embedded_target

QUESTIONS = [
    "What is 12 + 7?", "Name three colours.", "What is the capital of Italy?", "What is 9 * 6?",
    "Write a short greeting.", "What is 100 - 37?", "Which animal says moo?", "What is 5 + 8?",
]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_ratios(models: dict, names: list[str], tokenizer, batch_size: int, max_new_tokens: int,
                   repeats: int) -> dict:
    """`{name: {plain_seconds, eu_seconds, ratio}}`: every estimator timed interleaved with plain `generate`."""
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in QUESTIONS[:batch_size]]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    args = dict(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
    plain = lambda: models["main"].target.generate(**args)  # noqa: E731
    runs = {name: (lambda n=name: models["idd" if n == "hf_eu_idd" else "main"].generate(
        **args, estimator=n, return_dict_in_generate=True)) for name in names}
    plain()
    for run in runs.values():  # warm-up
        run()
    plain_s, eu_s = {name: [] for name in names}, {name: [] for name in names}
    for _ in range(repeats):  # each estimator right after its own plain run, so load drifts hit both alike
        for name, run in runs.items():
            plain_s[name].append(timed(plain))
            eu_s[name].append(timed(run))
    return {name: {"plain_seconds": round(statistics.median(plain_s[name]), 3),
                   "eu_seconds": round(statistics.median(eu_s[name]), 3),
                   "ratio": round(statistics.median(eu_s[name]) / statistics.median(plain_s[name]), 3)}
            for name in names}


def measure_memory(model, batch_size: int, prompt_length: int, answer_length: int) -> float:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 49152, (batch_size, prompt_length + answer_length), generator=generator)
    score = lambda ids: model.estimate_uncertainty(ids, prompt_length=prompt_length, estimator="hf_eu")  # noqa: E731
    score(input_ids[:, :prompt_length + 4])  # warm-up
    return round(peak_extra_memory_mb(lambda: score(input_ids)), 1)


def main() -> None:
    from benchmarks.eval_scoring import estimator_names
    from benchmarks.eval_setup import SCALES, load_models

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--estimators", default=None, help="comma-separated names (default: the evaluation's)")
    parser.add_argument("--composite", default=None, help="composite folder (default: the shipped one)")
    parser.add_argument("--out", default="benchmarks/results/overhead.json")
    args = parser.parse_args()

    if args.composite is None and not has_trained_defaults():
        raise SystemExit("The shipped defaults are missing (hf_eu/defaults/); run `make train-defaults` first.")
    target, tokenizer = load_embedded_target()
    tokenizer.padding_side = "left"
    main_model = UncertaintyAwareModelForCausalLM.from_pretrained(args.composite or DEFAULT_COMPOSITE_DIR, target=target)
    idd_model = UncertaintyAwareModelForCausalLM.from_pretrained(IDD_COMPOSITE_DIR, target=target)
    models = {"main": main_model, "idd": idd_model}
    names = args.estimators.split(",") if args.estimators else estimator_names(load_models(SCALES["small"]))
    # memory first: the resident-set high-water mark only rises, so after the timing runs it would show nothing
    memory = {length: measure_memory(main_model, 8, 32, length) for length in (args.max_new_tokens,
                                                                               4 * args.max_new_tokens)}
    results = {}
    for batch_size in (1, 8):
        results[f"batch{batch_size}"] = measure_ratios(models, names, tokenizer, batch_size, args.max_new_tokens,
                                                       args.repeats)
        print(f"batch {batch_size}: " + ", ".join(f"{n} {r['ratio']}" for n, r in results[f"batch{batch_size}"].items()),
              flush=True)
    print(f"peak extra memory of scoring, batch 8, by answer length: {memory} MiB", flush=True)
    default = main_model.config.estimator
    result = {
        "default_estimator": default,
        "ratio_batch1": results["batch1"].get(default, {}).get("ratio"),
        "ratio_batch8": results["batch8"].get(default, {}).get("ratio"),
        "ratios": {name: {"batch1": results["batch1"][name]["ratio"], "batch8": results["batch8"][name]["ratio"]}
                   for name in names},
        "peak_extra_memory_mb": memory[args.max_new_tokens],
        "peak_extra_memory_mb_by_answer_length": memory,
        "details": {**results, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
                    "composite": f"{args.composite or 'hf_eu/defaults/smollm2-135m-instruct'} (hf_eu_idd: "
                                 "hf_eu/defaults/smollm2-135m-instruct-idd)",
                    "target": "SmolLM2-135M-Instruct (30 layers), float32", "chunk_size": "auto (128 MiB budget)",
                    "memory": "shipped composite's estimate_uncertainty(estimator='hf_eu'): 3 drafts + proxy, batch 8, "
                              "prompt 32 tokens, measured before the timing runs"},
        "command": command("benchmarks.overhead"),
        "machine": machine(),
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
