"""Wall-time overhead of `generate` with EU over the target's plain `generate`, and scoring memory.

Usage (what `make bench-overhead` runs; about 5 minutes on 2 CPU cores):

    python -m benchmarks.overhead
    python -m benchmarks.overhead --repeats 5 --max-new-tokens 64 --out benchmarks/results/overhead.json

On SmolLM2-135M-Instruct (the embedded target) with 3 drafts and a proxy of 4 layers each (truncated
copies of the target: the cost of a draft does not depend on its training), it times, side by side
and interleaved in one run, `target.generate(...)` and `model.generate(..., return_dict_in_generate=True)`
at batch 1 and batch 8 with the same greedy arguments (min = max new tokens, so both produce the same
number of tokens), and reports the ratio of medians. It then measures the peak extra resident memory
of scoring a batch of 8 at two answer lengths (resident-set high-water mark, Linux).
It does all of this twice: drafts and proxy in float32 (the keys `ratio_batch1`, `ratio_batch8`) and in
bfloat16 (`bfloat16_drafts`), since this CPU runs bfloat16 matmuls about 2x faster; and, when trained
defaults ship, once more for them (`shipped_defaults`: LoRA drafts on 4 target layers and a LoRA proxy
on all 30, which costs one target-sized teacher-forced pass more).
Writes `ratio_batch1`, `ratio_batch8`, `peak_extra_memory_mb`, `command`, `machine` and details.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import command, machine, write_result
from benchmarks.memory_probe import peak_extra_memory_mb
from hf_eu import UncertaintyAwareModelForCausalLM, truncated_copy
from hf_eu.defaults import DEFAULT_COMPOSITE_DIR, has_trained_defaults
from hf_eu.embedded import load_embedded_target

QUESTIONS = [
    "What is 12 + 7?", "Name three colours.", "What is the capital of Italy?", "What is 9 * 6?",
    "Write a short greeting.", "What is 100 - 37?", "Which animal says moo?", "What is 5 + 8?",
]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_ratio(model, tokenizer, batch_size: int, max_new_tokens: int, repeats: int) -> dict:
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in QUESTIONS[:batch_size]]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    args = dict(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
    plain = lambda: model.target.generate(**args)  # noqa: E731
    with_eu = lambda: model.generate(**args, return_dict_in_generate=True)  # noqa: E731
    plain(), with_eu()  # warm-up
    plain_s, eu_s = [], []
    for _ in range(repeats):  # interleaved so drifts in machine load hit both alike
        plain_s.append(timed(plain))
        eu_s.append(timed(with_eu))
    return {"plain_seconds": round(statistics.median(plain_s), 3), "eu_seconds": round(statistics.median(eu_s), 3),
            "ratio": round(statistics.median(eu_s) / statistics.median(plain_s), 3)}


def measure_memory(model, batch_size: int, prompt_length: int, answer_length: int) -> float:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 49152, (batch_size, prompt_length + answer_length), generator=generator)
    model.estimate_uncertainty(input_ids[:, :prompt_length + 4], prompt_length=prompt_length)  # warm-up
    return round(peak_extra_memory_mb(lambda: model.estimate_uncertainty(input_ids, prompt_length=prompt_length)), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--draft-layers", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/overhead.json")
    args = parser.parse_args()

    target, tokenizer = load_embedded_target()
    tokenizer.padding_side = "left"
    results = {}
    for dtype in (torch.float32, torch.bfloat16):  # drafts and proxy in float32 (default), then bfloat16
        drafts = [truncated_copy(target, args.draft_layers, dtype=dtype) for _ in range(3)]
        proxy = truncated_copy(target, args.draft_layers, dtype=dtype)
        model = UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=drafts, proxy=proxy)
        name = str(dtype).removeprefix("torch.")
        results[name] = {f"batch{b}": measure_ratio(model, tokenizer, b, args.max_new_tokens, args.repeats)
                         for b in (1, 8)}
        print(f"drafts in {name}: {results[name]}", flush=True)
    memory = {length: measure_memory(model, 8, 32, length) for length in (args.max_new_tokens, 4 * args.max_new_tokens)}
    if has_trained_defaults():  # the composite that ships: LoRA drafts on 4 target layers, full-depth LoRA proxy
        shipped = UncertaintyAwareModelForCausalLM.from_pretrained(DEFAULT_COMPOSITE_DIR, target=target)
        results["shipped_defaults"] = {f"batch{b}": measure_ratio(shipped, tokenizer, b, args.max_new_tokens,
                                                                  args.repeats) for b in (1, 8)}
        print(f"shipped defaults: {results['shipped_defaults']}", flush=True)
    print(f"peak extra memory of scoring, batch 8, by answer length: {memory} MiB", flush=True)

    result = {
        "ratio_batch1": results["float32"]["batch1"]["ratio"],
        "ratio_batch8": results["float32"]["batch8"]["ratio"],
        "peak_extra_memory_mb": memory[args.max_new_tokens],
        "peak_extra_memory_mb_by_answer_length": memory,
        "bfloat16_drafts": {"ratio_batch1": results["bfloat16"]["batch1"]["ratio"],
                            "ratio_batch8": results["bfloat16"]["batch8"]["ratio"]},
        **({"shipped_defaults": {f"ratio_batch{b}": results["shipped_defaults"][f"batch{b}"]["ratio"] for b in (1, 8)}}
           if "shipped_defaults" in results else {}),
        "details": {**results, "max_new_tokens": args.max_new_tokens,
                    "drafts": f"3 x {args.draft_layers}-layer truncated SmolLM2", "proxy": f"{args.draft_layers}-layer",
                    "target": "SmolLM2-135M-Instruct (30 layers), float32", "chunk_size": "auto (128 MiB budget)",
                    "memory": "bfloat16 drafts, batch 8, prompt 32 tokens, answers of the given lengths"},
        "command": command("benchmarks.overhead"),
        "machine": machine(),
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
