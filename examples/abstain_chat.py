"""A chat loop that answers "I am not sure." when the answer's epistemic uncertainty runs too high.

Usage:

    python examples/abstain_chat.py                                   # interactive; empty line or Ctrl-D ends
    python examples/abstain_chat.py --question "What is 2+3?"         # one turn, non-interactive
    python examples/abstain_chat.py --question "Who ruled Burkina Faso in 1987?" --threshold 8 --window 4

Loads the shipped SmolLM2-135M-Instruct composite with `hf_eu.load_default()` and generates each
reply greedily with an `EUThresholdCriteria` among the stopping criteria: once the mean EU of the
last `--window` tokens exceeds `--threshold` nats, the target stops, `out.stopped_for_uncertainty` is
True, and the reply becomes "I am not sure." (what was generated before the stop is printed as a
note, and the abstention, not the cut answer, goes into the history). Note the stop comes after the
token that crossed the threshold.

The threshold is in nats of per-token EU. With the shipped drafts and proxy, tokens of answers
typically score 2-10 nats and their running mean over 4 tokens stays below about 9 on questions the
model answers ("What is 2+3?" peaks near 4); tune `--threshold` on your own questions.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from hf_eu import EUThresholdCriteria, aggregate_uncertainty, load_default

ABSTENTION = "I am not sure."


def answer(model, tokenizer, messages: list[dict], criteria: EUThresholdCriteria, max_new_tokens: int) -> dict:
    """Generate the assistant's reply to `messages`; abstain when the criterion stopped the row.

    Returns a dict: `reply` (the text to show), `stopped` (bool), `generated` (the decoded tokens,
    cut where the criterion stopped), `mean_eu` (mean EU of the generated tokens, nats).
    """
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                         stopping_criteria=[criteria])
    new_tokens = out.sequences[0, inputs["input_ids"].shape[1]:]
    generated = tokenizer.decode(new_tokens[out.uncertainty_mask[0]], skip_special_tokens=True).strip()
    stopped = bool(out.stopped_for_uncertainty[0])
    mean_eu = float(aggregate_uncertainty(out.epistemic_uncertainty, out.uncertainty_mask, "mean")[0])
    return {"reply": ABSTENTION if stopped else generated, "stopped": stopped, "generated": generated,
            "mean_eu": mean_eu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--question", action="append", help="ask this and exit (repeatable: one turn each)")
    parser.add_argument("--threshold", type=float, default=9.5, help="nats of running EU that end a reply")
    parser.add_argument("--window", type=int, default=4, help="number of recent tokens in the running EU")
    parser.add_argument("--aggregate", choices=["mean", "max"], default="mean")
    parser.add_argument("--min-new-tokens", type=int, default=0, help="never abstain before this many tokens")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    # ---------------------------------------------------------------- load
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untrained-fallback notice of a stripped install
        model, tokenizer = load_default()
    torch.set_grad_enabled(False)
    criteria = EUThresholdCriteria(model, args.threshold, window=args.window, aggregate=args.aggregate,
                                   min_new_tokens=args.min_new_tokens)

    # ----------------------------------------------------------- chat loop
    messages: list[dict] = []
    questions = iter(args.question) if args.question else None
    while True:
        question = next(questions, None) if questions is not None else _read_user()
        if not question:
            break
        if questions is not None:
            print(f"User: {question}")
        messages.append({"role": "user", "content": question})
        result = answer(model, tokenizer, messages, criteria, args.max_new_tokens)
        messages.append({"role": "assistant", "content": result["reply"]})
        print(f"Assistant: {result['reply']}")
        note = f"stopped for uncertainty after: {result['generated']!r}" if result["stopped"] else "answered"
        print(f"  [{note}; mean EU {result['mean_eu']:.2f} nats]")


def _read_user() -> str | None:
    try:
        return input("User: ").strip()
    except EOFError:
        return None


if __name__ == "__main__":
    main()
