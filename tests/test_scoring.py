"""Chunked teacher-forced scoring against a float64 brute force over full, uncached forwards."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from hf_eu import get_estimator, score_tokens

from test_divergences import brute_jsd, brute_kl


def full_logps64(model, input_ids, attention_mask):
    """Float64 log-probs of one uncached forward over the whole sequence: (B, L, V)."""
    model64 = copy.deepcopy(model).double()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model64(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    return logits.log_softmax(-1)


def brute_force_eu(drafts, reference, input_ids, attention_mask, prompt_length):
    """(variance, bias, EU) of shape (B, T) by Python loops over drafts and vocabulary, float64."""
    draft_probs = [full_logps64(d, input_ids, attention_mask).exp() for d in drafts]
    reference_probs = full_logps64(reference, input_ids, attention_mask).exp()
    batch, length = input_ids.shape
    out = torch.zeros(3, batch, length - prompt_length, dtype=torch.float64)
    for b in range(batch):
        for t in range(prompt_length, length):
            members = [p[b, t - 1].tolist() for p in draft_probs]  # logits at t-1 predict token t
            mix = [sum(m[v] for m in members) / len(members) for v in range(len(members[0]))]
            ref = reference_probs[b, t - 1].tolist()
            column = t - prompt_length
            out[0, b, column] = brute_jsd(members)
            out[1, b, column] = brute_kl(mix, ref)
            out[2, b, column] = sum(brute_kl(m, ref) for m in members) / len(members)
    return out


@pytest.fixture()
def sequences(batch):
    generator = torch.Generator().manual_seed(3)
    answer = torch.randint(3, 64, (2, 7), generator=generator)
    input_ids = torch.cat([batch["input_ids"], answer], dim=1)  # (2, 13)
    attention_mask = torch.cat([batch["attention_mask"], torch.ones_like(answer)], dim=1)
    return input_ids, attention_mask, batch["input_ids"].shape[1]


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_hf_eu_matches_float64_brute_force(target, drafts, proxy, sequences, chunk_size):
    input_ids, attention_mask, prompt_length = sequences
    out = score_tokens(get_estimator("hf_eu"), input_ids, prompt_length, drafts=drafts, proxy=proxy, target=target,
                       attention_mask=attention_mask, chunk_size=chunk_size)
    expected = brute_force_eu(drafts, proxy, input_ids, attention_mask, prompt_length)
    assert out.epistemic_uncertainty.dtype == torch.float32
    assert_close(out.eu_variance.double(), expected[0], atol=2e-5, rtol=1e-4)
    assert_close(out.eu_bias.double(), expected[1], atol=2e-5, rtol=1e-4)
    assert_close(out.epistemic_uncertainty.double(), expected[2], atol=2e-5, rtol=1e-4)  # = (1/K) Σ KL(q_k ‖ proxy)
    assert out.epistemic_uncertainty.min() > 0.01, "random tiny models should disagree visibly"


def test_without_proxy_the_bias_uses_the_target(target, drafts, sequences):
    input_ids, attention_mask, prompt_length = sequences
    out = score_tokens(get_estimator("hf_eu"), input_ids, prompt_length, drafts=drafts, proxy=None, target=target,
                       attention_mask=attention_mask, chunk_size=4)
    expected = brute_force_eu(drafts, target, input_ids, attention_mask, prompt_length)
    assert_close(out.epistemic_uncertainty.double(), expected[2], atol=2e-5, rtol=1e-4)
    no_osd = score_tokens(get_estimator("hf_eu_no_osd"), input_ids, prompt_length, drafts=drafts, proxy=None,
                          target=target, attention_mask=attention_mask)
    assert_close(no_osd.epistemic_uncertainty, out.epistemic_uncertainty)


def test_prompt_alone_equals_prompt_in_left_padded_batch(target, drafts, proxy, sequences):
    input_ids, attention_mask, prompt_length = sequences
    batched = score_tokens(get_estimator("hf_eu"), input_ids, prompt_length, drafts=drafts, proxy=proxy,
                           target=target, attention_mask=attention_mask)
    alone = score_tokens(get_estimator("hf_eu"), input_ids[1:, 2:], prompt_length - 2, drafts=drafts, proxy=proxy,
                         target=target)  # row 1 without its 2 padding tokens
    assert_close(batched.epistemic_uncertainty[1], alone.epistemic_uncertainty[0], atol=1e-5, rtol=1e-4)


def test_mask_zeroes_padding(target, drafts, proxy, sequences):
    input_ids, attention_mask, prompt_length = sequences
    attention_mask = attention_mask.clone()
    attention_mask[0, -3:] = 0  # right padding in the answer of row 0
    out = score_tokens(get_estimator("hf_eu"), input_ids, prompt_length, drafts=drafts, proxy=proxy, target=target,
                       attention_mask=attention_mask)
    assert out.uncertainty_mask[0].tolist() == [True] * 4 + [False] * 3
    assert (out.epistemic_uncertainty[0, -3:] == 0).all() and (out.epistemic_uncertainty[0, :4] > 0).all()


@pytest.mark.parametrize("prompt_length", [0, 13])
def test_prompt_length_out_of_range(target, drafts, proxy, sequences, prompt_length):
    input_ids, attention_mask, _ = sequences
    with pytest.raises(ValueError, match="prompt_length"):
        score_tokens(get_estimator("hf_eu"), input_ids, prompt_length, drafts=drafts, proxy=proxy, target=target)


PROBE = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "memory_probe.py")


def probe_peak_mb(length: int, chunk_size: int) -> float:
    result = subprocess.run(
        [sys.executable, PROBE, "--model", "tiny", "--length", str(length), "--chunk-size", str(chunk_size)],
        capture_output=True, text=True, check=True, timeout=300,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_extra_memory_mb"]


def test_peak_memory_does_not_grow_with_sequence_length():
    """At a fixed chunk size, scoring 4x longer sequences needs no more peak memory (vocab 32k, 4 models)."""
    short, long = probe_peak_mb(256, 16), probe_peak_mb(1024, 16)
    unchunked = probe_peak_mb(512, 512)  # one chunk holds every position of a shorter sequence
    assert long < short * 1.3 + 16, (short, long)
    assert unchunked > 4 * long, (long, unchunked)
