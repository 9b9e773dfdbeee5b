"""Drop-in contract of generate(): identical tokens to the target, plus EU when asked for."""

import pytest
import torch
from torch.testing import assert_close
from transformers.generation import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

from hf_eu import UncertaintyGenerateBeamOutput, UncertaintyGenerateOutput, generated_token_mask

from conftest import EOS_ID, PAD_ID

GENERATION_ARGS = [
    {"do_sample": False},
    {"do_sample": True, "top_k": 0, "temperature": 1.3},
    {"do_sample": True, "top_p": 0.9, "num_return_sequences": 2},
    {"num_beams": 3, "do_sample": False},
]


@pytest.mark.parametrize("args", GENERATION_ARGS)
@pytest.mark.parametrize("return_dict", [False, True])
def test_sequences_identical_to_target(eu_model, target, batch, args, return_dict):
    common = dict(**batch, max_new_tokens=12, return_dict_in_generate=return_dict, **args)
    torch.manual_seed(123)
    expected = target.generate(**common)
    torch.manual_seed(123)
    got = eu_model.generate(**common)
    if not return_dict:
        assert isinstance(got, torch.Tensor) and torch.equal(got, expected)
        return
    assert torch.equal(got.sequences, expected.sequences)
    beam = args.get("num_beams", 1) > 1
    assert isinstance(got, UncertaintyGenerateBeamOutput if beam else UncertaintyGenerateOutput)
    assert isinstance(got, GenerateBeamDecoderOnlyOutput if beam else GenerateDecoderOnlyOutput)
    # EU of every returned row (beams, several samples per prompt) equals a teacher-forced pass over it
    prompt_length = batch["input_ids"].shape[1]
    prompt_mask = batch["attention_mask"].repeat_interleave(got.sequences.shape[0] // batch["input_ids"].shape[0], 0)
    mask = torch.cat([prompt_mask, torch.ones_like(got.sequences[:, prompt_length:])], dim=1)
    scored = eu_model.estimate_uncertainty(got.sequences, attention_mask=mask, prompt_length=prompt_length)
    assert_close(got.epistemic_uncertainty, scored.epistemic_uncertainty * got.uncertainty_mask)
    assert (got.epistemic_uncertainty[got.uncertainty_mask] > 0).all()


@pytest.mark.parametrize("composite", ["eu_model", "gpt2_eu_model"])  # rotary and absolute positions
def test_single_prompt_equals_its_row_in_a_left_padded_batch(request, composite, batch):
    eu_model = request.getfixturevalue(composite)
    batched = eu_model.generate(**batch, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    alone = eu_model.generate(input_ids=batch["input_ids"][1:, 2:], max_new_tokens=8, do_sample=False,
                              return_dict_in_generate=True)
    assert torch.equal(batched.sequences[1, 2:], alone.sequences[0])
    mask = alone.uncertainty_mask[0]
    assert mask.any() and (alone.epistemic_uncertainty[0][mask] > 0.01).all()
    assert_close(batched.epistemic_uncertainty[1][mask], alone.epistemic_uncertainty[0][mask], atol=1e-5, rtol=1e-4)
    # teacher forcing the same two sequences: the padded row scores like the row alone
    prompt_length = batch["input_ids"].shape[1]
    full_mask = torch.cat([batch["attention_mask"], torch.ones_like(batched.sequences[:, prompt_length:])], dim=1)
    forced = eu_model.estimate_uncertainty(batched.sequences, attention_mask=full_mask, prompt_length=prompt_length)
    forced_alone = eu_model.estimate_uncertainty(alone.sequences, prompt_length=prompt_length - 2)
    assert_close(forced.epistemic_uncertainty[1], forced_alone.epistemic_uncertainty[0], atol=1e-5, rtol=1e-4)
    assert_close(forced_alone.epistemic_uncertainty[0][mask], alone.epistemic_uncertainty[0][mask])


def test_generated_eu_equals_teacher_forced_eu(eu_model, batch):
    out = eu_model.generate(**batch, max_new_tokens=10, do_sample=True, return_dict_in_generate=True)
    prompt_length = batch["input_ids"].shape[1]
    mask = torch.cat([batch["attention_mask"], torch.ones_like(out.sequences[:, prompt_length:])], dim=1)
    scored = eu_model.estimate_uncertainty(out.sequences, attention_mask=mask, prompt_length=prompt_length)
    assert_close(out.epistemic_uncertainty * out.uncertainty_mask, scored.epistemic_uncertainty * out.uncertainty_mask)
    assert_close(out.epistemic_uncertainty, out.eu_variance + out.eu_bias)


def test_uncertainty_mask_stops_after_eos():
    new_tokens = torch.tensor([[5, EOS_ID, PAD_ID, PAD_ID], [5, 6, 7, 8], [EOS_ID, EOS_ID, 9, 9]])
    mask = generated_token_mask(new_tokens, eos_token_id=[EOS_ID, 60], pad_token_id=PAD_ID)
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    # a pad token that is not EOS ends a row when it runs to the end (another stopping criterion finished it)
    mask = generated_token_mask(torch.tensor([[5, PAD_ID, 6, PAD_ID, PAD_ID]]), eos_token_id=EOS_ID,
                                pad_token_id=PAD_ID)
    assert mask.tolist() == [[True, True, True, False, False]]


def test_generate_masks_rows_that_ended(eu_model, batch):
    # make token 6 an EOS too, so that rows end early (row 0 greedily emits it first)
    out = eu_model.generate(**batch, max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                            eos_token_id=[EOS_ID, 6])
    new_tokens = out.sequences[:, batch["input_ids"].shape[1]:].tolist()
    expected = []
    for row in new_tokens:
        ended = [i for i, token in enumerate(row) if token in (EOS_ID, 6)]
        last = ended[0] if ended else len(row) - 1
        expected.append([i <= last for i in range(len(row))])
    assert out.uncertainty_mask.tolist() == expected
    assert not all(all(row) for row in expected), "the test needs at least one row that ended early"
    assert (out.epistemic_uncertainty[~out.uncertainty_mask] == 0).all()
    assert (out.epistemic_uncertainty[out.uncertainty_mask] > 0).all()


def test_other_generate_outputs_pass_through(eu_model, target, batch):
    out = eu_model.generate(**batch, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                            output_scores=True, output_logits=True)
    expected = target.generate(**batch, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                               output_scores=True, output_logits=True)
    assert len(out.scores) == 5 and all(torch.equal(a, b) for a, b in zip(out.scores, expected.scores))
    assert all(torch.equal(a, b) for a, b in zip(out.logits, expected.logits))


def test_estimator_override(eu_model, batch):
    out = eu_model.generate(**batch, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                            estimator="entropy")
    assert out.eu_variance is None and out.eu_bias is None
    assert (out.epistemic_uncertainty[out.uncertainty_mask] > 0).all()
    with pytest.raises(ValueError, match="Unknown estimator"):
        eu_model.generate(**batch, max_new_tokens=5, return_dict_in_generate=True, estimator="entropyy")


def test_assistant_draft_batch_one(eu_model, target, batch):
    prompt = batch["input_ids"][:1]
    plain = target.generate(input_ids=prompt, max_new_tokens=10, do_sample=False)
    assisted = eu_model.generate(input_ids=prompt, max_new_tokens=10, do_sample=False, assistant_draft=1,
                                 return_dict_in_generate=True)
    assert torch.equal(assisted.sequences, plain)  # greedy assisted decoding keeps the target's tokens
    reference = eu_model.generate(input_ids=prompt, max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    assert_close(assisted.epistemic_uncertainty, reference.epistemic_uncertainty)


def test_assistant_draft_batch_above_one_warns_once(eu_model, target, batch, caplog):
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    logging.Logger.warning_once.cache_clear()  # transformers' once-per-process cache: an earlier test may have warned
    expected = target.generate(**batch, max_new_tokens=6, do_sample=False)
    with caplog.at_level("WARNING"):
        first = eu_model.generate(**batch, max_new_tokens=6, do_sample=False, assistant_draft=0)
        eu_model.generate(**batch, max_new_tokens=6, do_sample=False, assistant_draft=0)
    assert torch.equal(first, expected)
    warnings = [r for r in caplog.records if "batch size 1 only" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # the first call warns, the second does not
    assert warnings[0].levelname == "WARNING" and "batch of 2" in warnings[0].getMessage()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": 0, "return_dict_in_generate": True}, "max_new_tokens=0"),
        ({"max_new_tokens": 3, "assistant_draft": 7}, "assistant_draft"),
        ({"max_length": 6, "return_dict_in_generate": True}, "max_length"),  # transformers refuses it itself
    ],
)
def test_bad_generate_arguments(eu_model, batch, kwargs, match):
    with pytest.raises(ValueError, match=match):
        eu_model.generate(**batch, **kwargs)


def test_inputs_embeds_only_with_return_dict_is_refused(eu_model, target, batch):
    embeds = target.get_input_embeddings()(batch["input_ids"])
    with pytest.raises(ValueError, match="input_ids"):
        eu_model.generate(inputs_embeds=embeds, max_new_tokens=3, return_dict_in_generate=True)
