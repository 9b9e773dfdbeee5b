"""Measure the shipped default drafts and proxy against the plain target, side by side in one run.

Usage (about 5-10 minutes on 2 CPU cores, after `make train-defaults`):

    python -m benchmarks.training
    python -m benchmarks.training --questions 16 --max-new-tokens 48 --out benchmarks/results/training.json

On held-out questions (evaluation seeds < 1000, minus any text the defaults trained on) the target
answers greedily; on those answers, teacher-forced, it measures:
- `draft_kl_trained` / `draft_kl_untrained`: mean forward KL(target ‖ draft) per answer token, over the
  trained drafts and over the same architecture untrained (the target's first layers, no adapter);
- `proxy_kl_to_bma` / `target_kl_to_bma`: KL(BMA ‖ proxy) and KL(BMA ‖ target), BMA = mean of 16
  perturbed targets (r = 8, σ = 0.1); OSD should make the first smaller;
- `mean_jsd_ddd` / `mean_jsd_identical`: mean JSD among the DDD drafts and among the IDD drafts;
- `acceptance_rate`: greedy agreement of the best draft with the target (what greedy speculative
  decoding accepts), and, timing `generate` with that draft as `assistant_model` against plain
  `generate` at batch 1: `tokens_per_target_forward` and `assisted_speedup_batch1`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.common import command, machine, write_result
from hf_eu import UncertaintyAwareModelForCausalLM, truncated_copy
from hf_eu.defaults import DEFAULT_COMPOSITE_DIR, IDD_COMPOSITE_DIR
from hf_eu.divergences import jsd, kl, mixture_logps
from hf_eu.embedded import load_embedded_target
from hf_eu.perturbation import LowRankGaussianPerturbation
from trainers.questions import reasoning_gym_questions

def held_out_questions(count: int, composite_dir: str) -> list[str]:
    trained = set(json.load(open(os.path.join(composite_dir, "train_questions.json"))))
    pool = []
    for task in ("gsm_symbolic", "arith_basic", "arith_chain_sum", "arith_products"):
        pool += [q["question"] for q in reasoning_gym_questions(task, 4 * count, seed=1) if q["question"] not in trained]
    per_task = max(1, count // 4)
    return [q for k in range(4) for q in pool[k * 4 * count:][:per_task]][:count] or pool[:count]


def greedy_answers(target, tokenizer, questions: list[str], max_new_tokens: int) -> list[tuple[torch.Tensor, int]]:
    """(ids of prompt + answer, prompt length) for each question, answered greedily one at a time."""
    answers = []
    for question in questions:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            ids = target.generate(input_ids=prompt, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append((ids, prompt.shape[1]))
    return answers


def answer_logps(model, ids: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Float32 log-probs `(T, V)` predicting the answer tokens, teacher-forced."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, prompt_length - 1 : -1]  # (T, V)
    return logits.float().log_softmax(-1)


def measure_answer(ids, prompt_length, target, model, idd, untrained, perturbation, bma_samples) -> dict:
    """Per-token values `(T,)` of every quantity on one answer."""
    logps = lambda m: answer_logps(m, ids, prompt_length)  # noqa: E731
    target_logps = logps(target)
    drafts = torch.stack([logps(d) for d in model.drafts])  # (K, T, V)
    members = []
    for seed in range(50_000, 50_000 + bma_samples):  # seeds no training run used
        with perturbation.apply(seed):
            members.append(logps(target))
    bma = mixture_logps(torch.stack(members))  # (T, V)
    values = {
        "draft_kl_trained": kl(target_logps.unsqueeze(0), drafts).mean(0),
        "draft_kl_untrained": kl(target_logps, logps(untrained)),
        "proxy_kl_to_bma": kl(bma, logps(model.proxy)),
        "target_kl_to_bma": kl(bma, target_logps),
        "mean_jsd_ddd": jsd(drafts),
        "mean_jsd_identical": jsd(torch.stack([logps(d) for d in idd.drafts])),
    }
    for k in range(drafts.shape[0]):
        values[f"agreement_draft_{k}"] = (drafts[k].argmax(-1) == target_logps.argmax(-1)).float()
    return values


def assisted_timing(target, assistant, tokenizer, questions, max_new_tokens: int) -> dict:
    calls = {"n": 0}
    hook = target.register_forward_hook(lambda *args: calls.__setitem__("n", calls["n"] + 1))
    plain_s, assisted_s, new_tokens, target_calls = [], [], 0, 0
    try:
        for question in questions:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)["input_ids"]
            args = dict(input_ids=prompt, max_new_tokens=max_new_tokens, do_sample=False)
            start = time.perf_counter()
            plain = target.generate(**args)
            plain_s.append(time.perf_counter() - start)
            calls["n"] = 0
            start = time.perf_counter()
            assisted = target.generate(**args, assistant_model=assistant)
            assisted_s.append(time.perf_counter() - start)
            target_calls += calls["n"]
            new_tokens += assisted.shape[1] - prompt.shape[1]
            assert torch.equal(plain, assisted), "greedy assisted decoding must keep the target's tokens"
    finally:
        hook.remove()
    return {"tokens_per_target_forward": round(new_tokens / max(1, target_calls), 3),
            "assisted_speedup_batch1": round(sum(plain_s) / sum(assisted_s), 3),
            "plain_seconds": round(sum(plain_s), 2), "assisted_seconds": round(sum(assisted_s), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--bma-samples", type=int, default=16)
    parser.add_argument("--composite", default=DEFAULT_COMPOSITE_DIR, help="trained composite (default: shipped)")
    parser.add_argument("--idd", default=IDD_COMPOSITE_DIR, help="composite of the IDD ablation drafts")
    parser.add_argument("--out", default="benchmarks/results/training.json")
    args = parser.parse_args()

    target, tokenizer = load_embedded_target()
    model = UncertaintyAwareModelForCausalLM.from_pretrained(args.composite, target=target)
    idd = UncertaintyAwareModelForCausalLM.from_pretrained(args.idd, target=target)
    layers = model.drafts[0].get_base_model().config.hf_eu_target_layers
    untrained = truncated_copy(target, layers)
    questions = held_out_questions(args.questions, args.composite)
    answers = greedy_answers(target, tokenizer, questions, args.max_new_tokens)
    print(f"{len(answers)} held-out answers, {sum(ids.shape[1] - p for ids, p in answers)} tokens", flush=True)

    perturbation = LowRankGaussianPerturbation(target, rank=8, sigma=0.1)
    per_token: dict[str, list[torch.Tensor]] = {}
    for ids, prompt_length in answers:
        for name, value in measure_answer(ids, prompt_length, target, model, idd, untrained, perturbation,
                                          args.bma_samples).items():
            per_token.setdefault(name, []).append(value)
    result = {name: round(torch.cat(values).mean().item(), 4) for name, values in per_token.items()}
    agreements = [result.pop(f"agreement_draft_{k}") for k in range(len(model.drafts))]
    best = max(range(len(agreements)), key=agreements.__getitem__)
    result.update(acceptance_rate=agreements[best], acceptance_rate_each=agreements, assistant_draft=best)
    print(result, flush=True)
    result.update(assisted_timing(target, model.drafts[best], tokenizer, questions[:6], args.max_new_tokens))

    log = json.load(open(os.path.join(args.composite, "train_log.json")))
    composite_bytes, idd_bytes = (sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
                                  for root in (args.composite, args.idd))
    result.update(train_seconds=log["train_seconds"], defaults_mib=round((composite_bytes + idd_bytes) / 2**20, 2),
                  composite_mib=round(composite_bytes / 2**20, 2),
                  held_out_questions=len(answers), command=command("benchmarks.training"),
                  machine=machine())
    write_result(result, args.out)


if __name__ == "__main__":
    main()
