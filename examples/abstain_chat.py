"""A chat loop that answers "I am not sure." when the answer's epistemic uncertainty runs too high.

Usage:

    python examples/abstain_chat.py                                   # interactive; empty line or Ctrl-D ends
    python examples/abstain_chat.py --question "What is 2+3?"         # one turn, non-interactive
    python examples/abstain_chat.py --question "Who ruled Burkina Faso in 1987?" --threshold 0.3 --window 4
    python examples/abstain_chat.py --question "What is 48 * 67?" --max-risk 0.9   # also abstain on answer_risk

Loads the shipped SmolLM2-135M-Instruct composite with `hf_eu.load_default()` and generates each
reply greedily with an `EUThresholdCriteria` among the stopping criteria: once the mean EU of the
last `--window` tokens exceeds `--threshold` nats, the target stops, `out.stopped_for_uncertainty` is
True, and the reply becomes "I am not sure." (what was generated before the stop is printed as a
note, and the abstention, not the cut answer, goes into the history). Note the stop comes after the
token that crossed the threshold.

The threshold is in nats of per-token EU of the composite's estimator. With the shipped EU head, tokens
score about 0-0.4 nats ("What is 2+3?" peaks near 0.23); the default 9.5 never stops a reply, so pass a
threshold tuned on your own questions. With `--max-risk`, a finished reply whose `out.answer_risk` (the
probability that the answer is wrong) is above it becomes "I am not sure." too (`hf_eu.abstain`). The shipped
detector was fitted on arithmetic the target gets 77% wrong, so its risks run high ("2 + 3 = 5": 0.87,
"17 * 23 = 381.": 0.95): rank by it rather than read it as a probability for other questions.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from hf_eu import EUThresholdCriteria, abstain, aggregate_uncertainty, load_default

ABSTENTION = "I am not sure."


def answer(model, tokenizer, messages: list[dict], criteria: EUThresholdCriteria, max_new_tokens: int,
           max_risk: float | None = None) -> dict:
    """Generate the assistant's reply to `messages`; abstain when the criterion stopped the row, or (with
    `max_risk`) when the answer's risk of being wrong is above `max_risk`.

    Returns a dict: `reply` (the text to show), `stopped` (bool), `generated` (the decoded tokens,
    cut where the criterion stopped), `mean_eu` (mean EU of the generated tokens, nats), `risk` (or None).
    """
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                         stopping_criteria=[criteria])
    new_tokens = out.sequences[0, inputs["input_ids"].shape[1]:]
    generated = tokenizer.decode(new_tokens[out.uncertainty_mask[0]], skip_special_tokens=True).strip()
    stopped = bool(out.stopped_for_uncertainty[0])
    mean_eu = float(aggregate_uncertainty(out.epistemic_uncertainty, out.uncertainty_mask, "mean")[0])
    reply = ABSTENTION if stopped else generated
    if max_risk is not None and not stopped:
        reply = abstain([generated], out.answer_risk, max_risk, message=ABSTENTION)[0]
    risk = None if out.answer_risk is None else float(out.answer_risk[0])
    return {"reply": reply, "stopped": stopped, "generated": generated, "mean_eu": mean_eu, "risk": risk}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--question", action="append", help="ask this and exit (repeatable: one turn each)")
    parser.add_argument("--threshold", type=float, default=9.5, help="nats of running EU that end a reply")
    parser.add_argument("--window", type=int, default=4, help="number of recent tokens in the running EU")
    parser.add_argument("--aggregate", choices=["mean", "max"], default="mean")
    parser.add_argument("--min-new-tokens", type=int, default=0, help="never abstain before this many tokens")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-risk", type=float, default=None,
                        help="also abstain when the answer's risk of being wrong is above this (0-1; default: off)")
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
        result = answer(model, tokenizer, messages, criteria, args.max_new_tokens, args.max_risk)
        messages.append({"role": "assistant", "content": result["reply"]})
        print(f"Assistant: {result['reply']}")
        note = f"stopped for uncertainty after: {result['generated']!r}" if result["stopped"] else "answered"
        risk = "" if result["risk"] is None else f"; risk of a wrong answer {result['risk']:.0%}"
        print(f"  [{note}; mean EU {result['mean_eu']:.2f} nats{risk}]")


def _read_user() -> str | None:
    try:
        return input("User: ").strip()
    except EOFError:
        return None


if __name__ == "__main__":
    main()
