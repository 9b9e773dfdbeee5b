"""Hostile inputs and faulty parts (issue 16): each gets a clear error before any model runs, or the right result.

Non-finite uncertainty, non-causal models, boolean draft indices, sequences past a model's context, one rule for
`chunk_size`, a streamer whose `generate` fails before its first token, malformed token inputs at every public
entry point, and the memory budget of scoring at a 128k vocabulary. All models are the tiny random ones of
conftest.py (the memory ones a 131,072-token vocabulary with hidden size 8); each test runs in seconds.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import BertConfig, BertForMaskedLM, LlamaModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from conftest import VOCAB_SIZE, tiny_llama
from hf_eu import (EUTextIteratorStreamer, IncrementalScorer, UncertaintyAwareConfig, UncertaintyAwareModelForCausalLM,
                   get_estimator, score_tokens, score_tokens_many)
from hf_eu.scoring import DEFAULT_MAX_CHUNK_ELEMENTS, _auto_chunk_size

torch.set_num_threads(1)

PROMPT = torch.tensor([[1, 5, 9, 13, 17, 21]])
SEQUENCES = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [0, 0, 1, 7, 11, 3, 8, 4]])
MASK = torch.tensor([[1] * 8, [0, 0] + [1] * 6])


def forward_counter(models):
    """Forward pre-hooks counting every call of `models` (to show that no model ran)."""
    calls = []
    handles = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in models]
    return calls, handles


def logits_hook(model, edit):
    """Replace `model`'s logits by `edit(logits)` (a hook on its output head)."""
    return model.get_output_embeddings().register_forward_hook(lambda module, args, output: edit(output.clone()))


# ------------------------------------------------------------------------------------------- non-finite EU
def test_minus_inf_logits_give_finite_capped_eu(target, drafts, proxy):
    """A proxy that rules out half the vocabulary (−inf logits) where the drafts put mass: KL is capped, not inf."""
    def rule_out(logits):
        logits[..., VOCAB_SIZE // 2:] = float("-inf")
        return logits

    handles = [logits_hook(proxy, rule_out), logits_hook(target, rule_out)]
    try:
        eu_model = UncertaintyAwareModelForCausalLM(target, drafts, proxy)
        out = eu_model.estimate_uncertainty(SEQUENCES, MASK, prompt_length=4)
        logprob = score_tokens(get_estimator("neg_logprob"), torch.tensor([[1, 5, 9, 60]]), 2, drafts=drafts,
                               proxy=proxy, target=target)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.isfinite(out.epistemic_uncertainty).all() and (out.epistemic_uncertainty >= 0).all()
    assert (out.eu_bias[out.uncertainty_mask] > 1.0).all(), "mass where the proxy has none is a large bias"
    assert torch.isfinite(logprob.epistemic_uncertainty).all() and logprob.epistemic_uncertainty[0, 1] == 1e4


def nan_weights(model):
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.norm.weight[0] = float("nan")
    return broken


def overflowing_float16(model):
    """The model in float16 with output weights so large that its logits overflow to ±inf."""
    broken = copy.deepcopy(model).half()
    with torch.no_grad():
        broken.get_output_embeddings().weight.mul_(1e5)
    return broken


@pytest.mark.parametrize("part", ["draft 1", "proxy"])
@pytest.mark.parametrize("fault", [nan_weights, overflowing_float16], ids=["nan_weights", "float16_inf"])
def test_non_finite_outputs_are_refused_naming_the_part(target, drafts, proxy, part, fault):
    drafts = list(drafts)
    if part == "proxy":
        proxy = fault(proxy)
    else:
        drafts[1] = fault(drafts[1])
    eu_model = UncertaintyAwareModelForCausalLM(target, drafts, proxy)
    with pytest.raises(ValueError, match=f"The {part} produced NaN or \\+inf values"):
        eu_model.estimate_uncertainty(SEQUENCES, MASK, prompt_length=4)
    with pytest.raises(ValueError, match=f"The {part} produced NaN"):
        eu_model.generate(input_ids=PROMPT, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    scorer = IncrementalScorer(eu_model)
    scorer.start(PROMPT)
    with pytest.raises(ValueError, match=f"The {part} produced NaN"):
        scorer.step(torch.tensor([7]))


def test_a_nan_target_is_named(target, drafts, proxy):
    eu_model = UncertaintyAwareModelForCausalLM(nan_weights(target), drafts, proxy)
    with pytest.raises(ValueError, match="The target produced NaN"):
        eu_model.estimate_uncertainty(SEQUENCES, MASK, prompt_length=4, estimator="entropy")


# -------------------------------------------------------------------------------------- non-causal models
def bert_masked_lm():
    config = BertConfig(vocab_size=VOCAB_SIZE, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                        num_attention_heads=2)
    return BertForMaskedLM(config).eval()


@pytest.mark.parametrize("build", [lambda t: LlamaModel(t.config), lambda t: bert_masked_lm()],
                         ids=["LlamaModel", "BertForMaskedLM"])
def test_a_non_causal_target_is_refused_at_construction(target, drafts, build):
    model = build(target)
    name = type(model).__name__
    with pytest.raises(TypeError, match=f"The target is a {name}, which is not a causal language model.*"
                                        "AutoModelForCausalLM"):
        UncertaintyAwareModelForCausalLM.from_pretrained(model, drafts=drafts)
    with pytest.raises(TypeError, match=f"The draft 1 is a {name}"):
        UncertaintyAwareModelForCausalLM(target, [drafts[0], model])
    if name == "LlamaModel":
        with pytest.raises(TypeError, match="LlamaForCausalLM"):
            UncertaintyAwareModelForCausalLM(model, drafts)


# ------------------------------------------------------------------------------------- assistant_draft
@pytest.mark.parametrize("value", [True, False])
def test_boolean_assistant_draft_is_refused_before_decoding(eu_model, value):
    calls, handles = forward_counter([eu_model.target, *eu_model.drafts])
    try:
        with pytest.raises(TypeError, match=f"`assistant_draft` must be the int index.*got {value} \\(bool\\)"):
            eu_model.generate(input_ids=PROMPT, max_new_tokens=2, assistant_draft=value)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == []


# -------------------------------------------------------------------------------------- context length
def test_sequences_past_a_models_context_warn_once(target, drafts, proxy, caplog):
    short = copy.deepcopy(drafts[0])
    short.config.max_position_embeddings = 6
    eu_model = UncertaintyAwareModelForCausalLM(target, [short, *drafts[1:]], proxy)
    hf_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        first = eu_model.estimate_uncertainty(SEQUENCES, MASK, prompt_length=4)
        eu_model.estimate_uncertainty(SEQUENCES, MASK, prompt_length=4)
        eu_model.estimate_uncertainty(SEQUENCES[:, :6], MASK[:, :6], prompt_length=4)  # within the context
    warnings = [r.getMessage() for r in caplog.records if "context of" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "draft 0 (LlamaForCausalLM) has a context of 6 positions" in warnings[0] and "sequences of 8" in warnings[0]
    assert torch.isfinite(first.epistemic_uncertainty).all(), "still scored, with the warning"


# -------------------------------------------------------------------------------------------- chunk_size
@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True])
def test_chunk_size_follows_one_rule_everywhere(eu_model, target, drafts, proxy, chunk_size):
    with pytest.raises(ValueError) as from_config:
        UncertaintyAwareConfig(chunk_size=chunk_size)
    with pytest.raises(ValueError) as from_wrapper:
        UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=drafts, proxy=proxy, chunk_size=chunk_size)
    with pytest.raises(ValueError) as from_estimate:
        eu_model.estimate_uncertainty(SEQUENCES, MASK, prompt_length=4, chunk_size=chunk_size)
    with pytest.raises(ValueError) as from_scoring:
        score_tokens(get_estimator("hf_eu"), SEQUENCES, 4, drafts=drafts, proxy=proxy, target=target,
                     chunk_size=chunk_size)
    messages = {str(e.value) for e in (from_config, from_wrapper, from_estimate, from_scoring)}
    assert len(messages) == 1 and f"got {chunk_size!r}" in messages.pop()


# ---------------------------------------------------------------------------------------------- streamer
@pytest.fixture(scope="module")
def tokenizer():
    symbols = ["<pad>", "<s>", "</s>", *(f"t{i} " for i in range(3, VOCAB_SIZE))]
    backend = Tokenizer(models.WordLevel(vocab={s: i for i, s in enumerate(symbols)}, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def read_in_thread(streamer, generate, timeout=5.0, **kwargs):
    """Run `generate` in one thread and read `streamer` in another; return (seconds, pieces or the error raised)."""
    result = {}

    def read():
        try:
            result["value"] = list(streamer)
        except Exception as error:  # noqa: BLE001 - the error is what the test looks at
            result["value"] = error

    reader = threading.Thread(target=read, daemon=True)
    started = time.monotonic()
    reader.start()
    threading.Thread(target=lambda: _swallow(generate, streamer=streamer, **kwargs), daemon=True).start()
    reader.join(timeout)
    assert not reader.is_alive(), f"the reading loop still waits after {timeout} s"
    return time.monotonic() - started, result["value"]


def _swallow(generate, **kwargs):
    try:
        generate(**kwargs)
    except Exception:  # noqa: BLE001 - the reading thread re-raises it
        pass


@pytest.mark.parametrize(("kwargs", "match"), [({"max_new_tokens": -1}, "max_new_tokens"),
                                               ({"max_new_tokens": 3, "num_beams": 2}, "beam")])
def test_streamer_raises_when_generate_fails_before_its_first_token(eu_model, tokenizer, kwargs, match):
    streamer = EUTextIteratorStreamer(tokenizer, eu_model)  # no timeout: only the failure can end the loop
    seconds, first = read_in_thread(streamer, eu_model.generate, input_ids=PROMPT, max_new_tokens=3)
    assert isinstance(first, list) and first, "a normal stream first"
    seconds, value = read_in_thread(streamer, eu_model.generate, input_ids=PROMPT, **kwargs)
    assert isinstance(value, ValueError) and match in str(value), value
    assert seconds < 1.0, seconds
    seconds, again = read_in_thread(streamer, eu_model.generate, input_ids=PROMPT, max_new_tokens=3)
    assert isinstance(again, list) and [t for p in again for t in p.token_ids] == [t for p in first for t in p.token_ids]


def test_streamer_reports_failures_of_the_targets_own_generate(eu_model, tokenizer):
    streamer = EUTextIteratorStreamer(tokenizer, eu_model)

    def generate(**kwargs):
        with streamer.reporting_failures():
            eu_model.target.generate(**kwargs)

    seconds, value = read_in_thread(streamer, generate, input_ids=PROMPT, max_new_tokens=-1)
    assert isinstance(value, ValueError) and seconds < 1.0


# ------------------------------------------------------------------------------------ malformed token inputs
CASES = {  # name: (input_ids, attention_mask, prompt_length, error, what the message must name)
    "empty input_ids": (torch.zeros(2, 0, dtype=torch.long), None, 1, ValueError, r"`input_ids` is empty, shape \(2, 0\)"),
    "float input_ids": (SEQUENCES.float(), MASK, 4, TypeError, "`input_ids` must hold integer token ids, got dtype "
                                                               "torch.float32.*long"),
    "id above the vocabulary": (SEQUENCES.masked_fill(SEQUENCES == 29, 64), MASK, 4, ValueError,
                                r"holds the id 64 \(row 0, column 7\), outside the models' vocabulary \[0, 64\)"),
    "negative id": (SEQUENCES.masked_fill(SEQUENCES == 5, -1), MASK, 4, ValueError, "holds the id -1 \\(row 0, column 1"),
    "mask of another shape": (SEQUENCES, MASK[:, :5], 4, ValueError, r"`attention_mask` has shape \(2, 5\) but must have "
                                                                    r"shape \(2, 8\)"),
    "mask of another batch": (SEQUENCES, MASK[:1], 4, ValueError, r"`attention_mask` has batch size \(1, 8\)"),
    "empty batch": (SEQUENCES[:0], MASK[:0], 4, ValueError, r"`input_ids` is empty, shape \(0, 8\)"),
    "1-D input_ids": (SEQUENCES[0], None, 4, ValueError, r"shape \(batch_size, seq_len\), got \(8,\).*\[None\]"),
    "list input_ids": (SEQUENCES.tolist(), None, 4, TypeError, "`input_ids` must be a torch.Tensor.*got list"),
    "list attention_mask": (SEQUENCES, MASK.tolist(), 4, TypeError, "`attention_mask` must be a torch.Tensor.*got list"),
    "float prompt_length": (SEQUENCES, MASK, 4.0, TypeError, r"`prompt_length` must be an int.*got 4.0 \(float\)"),
    "bool prompt_length": (SEQUENCES, MASK, True, TypeError, r"`prompt_length` must be an int.*got True \(bool\)"),
}
ENTRY_POINTS = ["generate", "estimate_uncertainty", "score_tokens", "score_tokens_many"]


def call(entry, eu_model, input_ids, attention_mask, prompt_length):
    parts = dict(drafts=eu_model.drafts, proxy=eu_model.proxy, target=eu_model.target, attention_mask=attention_mask)
    if entry == "generate":
        return eu_model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=2,
                                 return_dict_in_generate=True)
    if entry == "estimate_uncertainty":
        return eu_model.estimate_uncertainty(input_ids, attention_mask, prompt_length=prompt_length)
    if entry == "score_tokens":
        return score_tokens(get_estimator("hf_eu"), input_ids, prompt_length, **parts)
    return score_tokens_many([get_estimator("hf_eu"), get_estimator("entropy")], input_ids, prompt_length, **parts)


@pytest.mark.parametrize(("case", "entry"), [(case, entry) for case in CASES for entry in ENTRY_POINTS
                                             if not (entry == "generate" and "prompt_length" in case)])
def test_malformed_inputs_get_a_clear_error_before_any_model_runs(eu_model, case, entry):
    """46 pairs of 12 malformed inputs and 4 entry points (generate has no `prompt_length`)."""
    input_ids, attention_mask, prompt_length, error, match = CASES[case]
    calls, handles = forward_counter([eu_model.target, *eu_model.drafts, eu_model.proxy])
    try:
        with pytest.raises(error, match=match):
            call(entry, eu_model, input_ids, attention_mask, prompt_length)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [], f"{len(calls)} forward calls ran before the error"


def test_uncertainty_mask_of_another_shape_is_refused(target, drafts, proxy):
    with pytest.raises(ValueError, match=r"`uncertainty_mask` has shape \(2, 5\) but must have shape \(2, 4\)"):
        score_tokens(get_estimator("hf_eu"), SEQUENCES, 4, drafts=drafts, proxy=proxy, target=target,
                     uncertainty_mask=torch.ones(2, 5, dtype=torch.bool))


# ------------------------------------------------------------------------------------ memory at a 128k vocabulary
BIG_VOCAB = 131_072


@pytest.fixture(scope="module")
def big_models():
    """(target, 3 drafts, proxy) with a 131,072-token vocabulary and hidden size 8."""
    built = [tiny_llama(seed, hidden_size=8, num_layers=1, vocab_size=BIG_VOCAB) for seed in (0, 10, 11, 12, 20)]
    return built[0], built[1:4], built[4]


@pytest.mark.parametrize(("estimator", "slots"), [("hf_eu", 4), ("entropy", 1), ("tokur_m4", 4)])
def test_automatic_chunk_fits_the_budget_at_a_128k_vocabulary(big_models, estimator, slots):
    """Batch 4, automatic chunk size: the chunk's log-probs of every model plus the estimator's temporaries fit
    2**25 floats (128 MiB), and the chunk is the largest that does."""
    target, drafts, proxy = big_models
    chosen = get_estimator(estimator)
    widths = []  # positions of every logits tensor the models produced
    hooks = [m.get_output_embeddings().register_forward_hook(lambda mod, a, out: widths.append(out.shape[1]))
             for m in (target, *drafts, proxy)]
    input_ids = torch.randint(3, BIG_VOCAB, (4, 40), generator=torch.Generator().manual_seed(0))
    try:
        out = score_tokens(chosen, input_ids, 8, drafts=drafts, proxy=proxy, target=target)
    finally:
        for hook in hooks:
            hook.remove()
    chunk = max(widths)
    per_position = (slots + max(2, chosen.working_copies)) * 4 * BIG_VOCAB  # floats per scored position
    assert chunk * per_position <= DEFAULT_MAX_CHUNK_ELEMENTS < (chunk + 1) * per_position, (chunk, per_position)
    assert chunk == _auto_chunk_size(slots + max(2, chosen.working_copies), 4, BIG_VOCAB, DEFAULT_MAX_CHUNK_ELEMENTS)
    assert torch.isfinite(out.epistemic_uncertainty).all()


MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    import torch
    sys.path.insert(0, {tests!r})
    from conftest import tiny_llama
    from hf_eu import get_estimator, score_tokens
    torch.set_num_threads(1)
    models = [tiny_llama(seed, hidden_size=8, num_layers=1, vocab_size={vocab}) for seed in (0, 10, 11, 12, 20)]
    ids = torch.randint(3, {vocab}, (4, 72), generator=torch.Generator().manual_seed(0))
    run = lambda n: score_tokens(get_estimator("hf_eu"), ids[:, :n], 8, drafts=models[1:4], proxy=models[4],
                                 target=models[0])
    run(12)  # one-off allocations of the first call are not scoring memory
    def status_kb(field):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))
    open("/proc/self/clear_refs", "w").write("5")  # reset the resident high-water mark
    before = status_kb("VmRSS")
    run(72)
    print(json.dumps({{"peak_extra_mib": (status_kb("VmHWM") - before) / 1024}}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads Linux's resident high-water mark")
def test_scoring_peak_memory_holds_the_budget_at_a_128k_vocabulary():
    """Peak resident memory of hf_eu scoring above its baseline: vocabulary 131,072, batch 4, 64 scored positions,
    automatic chunk size. glibc's fixed mmap threshold makes freed tensors leave the resident set at once, so the
    peak is the live memory (with its default, heap reuse can keep up to ~1.7x more resident). It was 576 MiB
    before the budget counted the estimator's temporaries and the log-probs shared one buffer."""
    script = MEMORY_PROBE.format(tests=os.path.dirname(__file__), vocab=BIG_VOCAB)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                            check=True)
    peak = json.loads(result.stdout.strip().splitlines()[-1])["peak_extra_mib"]
    assert peak <= 128 + 16, f"{peak:.1f} MiB above baseline; the budget is 128 MiB (+16 MiB activations and noise)"


def test_learned_positions_past_the_context_are_refused_before_scoring(target, drafts, proxy):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    short = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB_SIZE, n_positions=6, n_embd=16, n_layer=1, n_head=2)).eval()
    eu_model = UncertaintyAwareModelForCausalLM(target, [short, *drafts[1:]], proxy)
    with pytest.raises(ValueError, match=r"draft 0 \(GPT2LMHeadModel\) has learned position embeddings for 6 "
                                         r"positions .* sequences of 8"):
        eu_model.estimate_uncertainty(SEQUENCES, MASK, prompt_length=4)
    within = eu_model.estimate_uncertainty(SEQUENCES[:, :6], MASK[:, :6], prompt_length=4)
    assert torch.isfinite(within.epistemic_uncertainty).all()


def test_the_streaming_scorer_refuses_prompt_ids_outside_the_vocabulary(eu_model):
    scorer = IncrementalScorer(eu_model)
    with pytest.raises(ValueError, match=f"input_ids.*{VOCAB_SIZE}"):
        scorer.start(torch.tensor([[1, 5, VOCAB_SIZE]]))
    assert not scorer.started  # refused before any prefill
    scorer.start(torch.tensor([[1, 5, VOCAB_SIZE - 1]]))
    assert scorer.started
