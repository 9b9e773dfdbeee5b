"""Per-token cost of streaming with EU over plain streaming, per estimator, on the shipped SmolLM2 composite.

Usage (about 10 minutes on 2 CPU cores):

    python -m benchmarks.streaming
    python -m benchmarks.streaming --repeats 3 --max-new-tokens 64 --estimators eu_head,hf_eu

Loads `hf_eu.load_default()` (SmolLM2-135M-Instruct with the shipped drafts and proxy) and, at batch 1
with the same greedy arguments (min = max new tokens, so every run yields the same number of tokens),
times for a few chat prompts, interleaved: `generate` in a thread feeding transformers'
`TextIteratorStreamer` (plain streaming) and feeding `EUTextIteratorStreamer` (streaming with EU),
each consumed to the end in the main thread. As a reference it also times the post-hoc path,
`generate(..., return_dict_in_generate=True)` (EU for the whole answer at the end, nothing streamed),
also in a thread: on this shared 2-core machine the same `generate` ran 3-7x slower in the main
thread than in a worker thread while other jobs loaded the CPU, so all arms run alike.
Writes `ratio` for the default estimator and `ratios` for every estimator (EU streaming seconds per token / plain
streaming seconds per token, ratio of the
sums over prompts of per-prompt medians), `command`, `machine` and per-token seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from threading import Thread

import torch
from transformers import TextIteratorStreamer

from benchmarks.common import command, machine, write_result
from hf_eu import EUTextIteratorStreamer, load_default

PROMPTS = ["What is 12 + 7?", "Name three colours.", "Write a short greeting."]


def stream_seconds(model, streamer, inputs: dict, generate_kwargs: dict) -> float:
    """Seconds from starting `generate` in a thread to the streamer's last item."""
    start = time.perf_counter()
    thread = Thread(target=model.generate, kwargs=dict(**inputs, streamer=streamer, **generate_kwargs))
    thread.start()
    for _ in streamer:
        pass
    thread.join()
    return time.perf_counter() - start


def post_hoc_seconds(model, inputs: dict, generate_kwargs: dict) -> float:
    """Seconds of `generate(..., return_dict_in_generate=True)`, also run in a thread (see the module docstring)."""
    start = time.perf_counter()
    thread = Thread(target=model.generate, kwargs=dict(**inputs, return_dict_in_generate=True, **generate_kwargs))
    thread.start()
    thread.join()
    return time.perf_counter() - start


def measure(models: dict, tokenizer, prompt: str, max_new_tokens: int, repeats: int,
            estimators: list[str]) -> dict[str, list[float]]:
    model = models["main"]
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = dict(tokenizer(text, return_tensors="pt"))
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
    runs = {
        "plain": lambda: stream_seconds(model, TextIteratorStreamer(tokenizer, skip_prompt=True), inputs, kwargs),
        "post_hoc": lambda: post_hoc_seconds(model, inputs, kwargs),
    }
    for name in estimators:
        owner = models["idd" if name == "hf_eu_idd" else "main"]
        runs[f"eu:{name}"] = lambda n=name, m=owner: stream_seconds(
            m, EUTextIteratorStreamer(tokenizer, m, estimator=n), inputs, kwargs)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, run in runs.items():  # warm-up
        run()
    for _ in range(repeats):  # interleaved so drifts in machine load hit all alike
        for name, run in runs.items():
            times[name].append(run())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the prompts to stream")
    parser.add_argument("--estimators", default=None, help="comma-separated names (default: the evaluation's)")
    parser.add_argument("--out", default="benchmarks/results/streaming.json")
    args = parser.parse_args()

    from benchmarks.eval_scoring import estimator_names
    from benchmarks.eval_setup import SCALES, load_models
    from hf_eu import UncertaintyAwareModelForCausalLM
    from hf_eu.defaults import IDD_COMPOSITE_DIR

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tokenizer = load_default()
        idd = UncertaintyAwareModelForCausalLM.from_pretrained(IDD_COMPOSITE_DIR, target=model.target)
    torch.set_grad_enabled(False)
    estimators = args.estimators.split(",") if args.estimators else estimator_names(load_models(SCALES["small"]))
    prompts = PROMPTS[: args.prompts]
    medians: dict[str, float] = {}
    for prompt in prompts:
        times = measure({"main": model, "idd": idd}, tokenizer, prompt, args.max_new_tokens, args.repeats, estimators)
        for name, values in times.items():
            medians[name] = medians.get(name, 0.0) + statistics.median(values)
        print(prompt, {name: [round(v, 2) for v in values] for name, values in times.items()}, flush=True)
    tokens = len(prompts) * args.max_new_tokens
    per_token = {name: total / tokens for name, total in medians.items()}
    default = f"eu:{model.config.estimator}"
    write_result({
        "default_estimator": model.config.estimator,
        "ratio": round(per_token[default] / per_token["plain"], 3) if default in per_token else None,
        "ratios": {name.removeprefix("eu:"): round(value / per_token["plain"], 3) for name, value in per_token.items()
                   if name.startswith("eu:")},
        "post_hoc_ratio": round(per_token["post_hoc"] / per_token["plain"], 3),
        "plain_streaming_seconds_per_token": round(per_token["plain"], 4),
        "eu_streaming_seconds_per_token": {name.removeprefix("eu:"): round(value, 4) for name, value in per_token.items()
                                           if name.startswith("eu:")},
        "post_hoc_eu_seconds_per_token": round(per_token["post_hoc"], 4),
        "prompts": prompts,
        "new_tokens_per_run": args.max_new_tokens,
        "repeats": args.repeats,
        "composite": f"{model.config.target_name_or_path}, {len(model.drafts)} drafts, "
                     f"{'a proxy' if model.proxy is not None else 'no proxy'}, estimator {model.config.estimator}",
        "command": command("benchmarks.streaming"),
        "machine": machine(),
    }, args.out)


if __name__ == "__main__":
    main()
