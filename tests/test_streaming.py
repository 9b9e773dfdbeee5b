"""Streaming with EU: the streamed per-token values equal the post-hoc ones, pieces join to the answer.

The tiny random models of conftest.py generate token ids 0..63; a byte-level tokenizer built here
over that vocabulary decodes them (it includes the two bytes of "é" as separate tokens, so a piece
must sometimes wait for the token that completes a character).
"""

from __future__ import annotations

import math
from threading import Thread

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from hf_eu import EUTextIteratorStreamer, EUTextPiece, EUTextStreamer, UncertaintyAwareModelForCausalLM

PROMPT = torch.tensor([[1, 5, 9, 13, 17, 21]])
# Byte-level symbols: "Ġ" is a space, "Ċ" a newline, "Ã" + "©" the two UTF-8 bytes of "é".
_SYMBOLS = ["<pad>", "<s>", "</s>", "Ġ", "Ċ", "Ã", "©", *"abcdefghijklmnopqrstuvwxyz0123456789",
            "Ġthe", "Ġand", "ing", "ed", "Ġa", "Ġis", "er", "Ġcat", "Ġdog", "Ġ1", "Ġ2", "Ġ3", "Ġ4", "Ġ5", "Ġ6",
            "Ġ7", "Ġ8", "Ġ9", "Ġ0", "Ġx", "Ġy"]
E_FIRST, E_SECOND = _SYMBOLS.index("Ã"), _SYMBOLS.index("©")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine two threads spin-wait
    (this file ran ~40x slower with them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    assert len(_SYMBOLS) == 64
    backend = Tokenizer(models.BPE(vocab={symbol: i for i, symbol in enumerate(_SYMBOLS)}, merges=[]))
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _stream(generate, streamer, **kwargs) -> list[EUTextPiece]:
    thread = Thread(target=generate, kwargs=dict(streamer=streamer, **kwargs))
    thread.start()
    pieces = list(streamer)
    thread.join()
    return pieces


def _post_hoc(eu_model, seed, **kwargs):
    torch.manual_seed(seed)
    return eu_model.generate(input_ids=PROMPT, return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampled"])
def test_streamed_eu_equals_post_hoc_eu(eu_model, tokenizer, sampling):
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=sampling)  # no early EOS: 12 tokens
    streamer = EUTextIteratorStreamer(tokenizer, eu_model, skip_special_tokens=True)
    torch.manual_seed(3)
    pieces = _stream(eu_model.generate, streamer, input_ids=PROMPT, **kwargs)
    out = _post_hoc(eu_model, 3, **kwargs)

    new_tokens = out.sequences[0, PROMPT.shape[1]:]
    assert [t for piece in pieces for t in piece.token_ids] == new_tokens.tolist()
    streamed = torch.tensor([e for piece in pieces for e in piece.eu])
    torch.testing.assert_close(streamed, out.epistemic_uncertainty[0], atol=1e-5, rtol=0)
    assert streamed.min() > 1e-3, "the tiny models disagree: EU is not trivially zero"
    assert "".join(piece.text for piece in pieces) == tokenizer.decode(new_tokens, skip_special_tokens=True)
    assert all(len(piece.eu) == len(piece.token_ids) for piece in pieces)


def test_streaming_with_the_targets_own_generate_stops_at_eos(eu_model, tokenizer):
    streamer = EUTextIteratorStreamer(tokenizer, eu_model)
    pieces = _stream(eu_model.target.generate, streamer, input_ids=PROMPT, max_new_tokens=12, do_sample=False)
    out = _post_hoc(eu_model, 0, max_new_tokens=12, do_sample=False)
    streamed = torch.tensor([e for piece in pieces for e in piece.eu])
    assert streamed.shape[0] == out.sequences.shape[1] - PROMPT.shape[1]
    torch.testing.assert_close(streamed, out.epistemic_uncertainty[0], atol=1e-5, rtol=0)


def test_one_streamer_serves_consecutive_generate_calls(eu_model, tokenizer):
    streamer = EUTextIteratorStreamer(tokenizer, eu_model)
    first = _stream(eu_model.generate, streamer, input_ids=PROMPT, max_new_tokens=6, min_new_tokens=6)
    prompt = torch.tensor([[1, 7, 11, 3]])
    second = _stream(eu_model.generate, streamer, input_ids=prompt, max_new_tokens=6, min_new_tokens=6)
    out = eu_model.generate(input_ids=prompt, max_new_tokens=6, min_new_tokens=6, return_dict_in_generate=True)
    torch.testing.assert_close(torch.tensor([e for p in second for e in p.eu]), out.epistemic_uncertainty[0],
                               atol=1e-5, rtol=0)
    assert sum(len(p.token_ids) for p in first) == 6


@pytest.mark.parametrize("estimator", ["hf_eu", "entropy", "neg_logprob", "tokur_m4"])
def test_estimators_reading_the_target_without_proxy(target, drafts, tokenizer, estimator):
    """With no proxy the reference is the target: the scorer runs the target (or its perturbed copies) itself."""
    eu_model = UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=drafts, estimator=estimator)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    pieces = _stream(eu_model.generate, EUTextIteratorStreamer(tokenizer, eu_model), input_ids=PROMPT, **kwargs)
    out = _post_hoc(eu_model, 0, **kwargs)
    torch.testing.assert_close(torch.tensor([e for p in pieces for e in p.eu]), out.epistemic_uncertainty[0],
                               atol=1e-5, rtol=0)


def test_assisted_decoding_puts_several_tokens_at_once(eu_model, tokenizer):
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, assistant_draft=0)
    pieces = _stream(eu_model.generate, EUTextIteratorStreamer(tokenizer, eu_model), input_ids=PROMPT, **kwargs)
    out = _post_hoc(eu_model, 0, **kwargs)
    assert [t for p in pieces for t in p.token_ids] == out.sequences[0, PROMPT.shape[1]:].tolist()
    torch.testing.assert_close(torch.tensor([e for p in pieces for e in p.eu]), out.epistemic_uncertainty[0],
                               atol=1e-5, rtol=0)


def test_a_split_character_waits_for_its_second_byte(eu_model, tokenizer):
    streamer = EUTextStreamer(tokenizer, eu_model, on_piece=(received := []).append)
    streamer.put(PROMPT)
    for token in (E_FIRST, E_SECOND, _SYMBOLS.index("Ġ"), _SYMBOLS.index("a")):
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert [p.text for p in received] == ["é", " ", "a"]
    assert received[0].token_ids == [E_FIRST, E_SECOND] and len(received[0].eu) == 2
    expected = eu_model.estimate_uncertainty(torch.cat([PROMPT, torch.tensor([[E_FIRST, E_SECOND, 3, 7]])], 1),
                                             prompt_length=PROMPT.shape[1]).epistemic_uncertainty[0]
    torch.testing.assert_close(torch.tensor([e for p in received for e in p.eu]), expected, atol=1e-5, rtol=0)


def test_callback_streamer_gives_the_iterators_pieces(eu_model, tokenizer):
    kwargs = dict(input_ids=PROMPT, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    received, ended = [], []
    eu_model.generate(streamer=EUTextStreamer(tokenizer, eu_model, on_piece=received.append,
                                              on_end=lambda: ended.append(True)), **kwargs)
    iterated = _stream(eu_model.generate, EUTextIteratorStreamer(tokenizer, eu_model), **kwargs)
    assert received == iterated and ended == [True]


def test_prompt_pieces_have_nan_eu_when_not_skipped(eu_model, tokenizer):
    streamer = EUTextIteratorStreamer(tokenizer, eu_model, skip_prompt=False)
    pieces = _stream(eu_model.generate, streamer, input_ids=PROMPT, max_new_tokens=4, min_new_tokens=4)
    token_ids = [t for p in pieces for t in p.token_ids]
    eu = [e for p in pieces for e in p.eu]
    assert token_ids[: PROMPT.shape[1]] == PROMPT[0].tolist()
    assert all(math.isnan(e) for e in eu[: PROMPT.shape[1]]) and not any(math.isnan(e) for e in eu[PROMPT.shape[1]:])
    assert len(eu) == PROMPT.shape[1] + 4


def test_batch_of_two_is_refused_in_generate_and_in_the_iterator(eu_model, tokenizer, batch):
    streamer = EUTextIteratorStreamer(tokenizer, eu_model, timeout=5)
    with pytest.raises(ValueError, match="batch of 2 rows.*batch size 1"):
        eu_model.generate(**batch, streamer=streamer, max_new_tokens=3)
    with pytest.raises(ValueError, match="batch of 2 rows"):
        next(iter(streamer))
    pieces = _stream(eu_model.generate, streamer, input_ids=PROMPT, max_new_tokens=3, min_new_tokens=3)
    assert sum(len(p.token_ids) for p in pieces) == 3, "the streamer recovers for the next call"


def test_num_return_sequences_is_a_batch_too(eu_model, tokenizer):
    streamer = EUTextStreamer(tokenizer, eu_model)
    with pytest.raises(ValueError, match="batch of 2 rows"):
        eu_model.target.generate(input_ids=PROMPT, streamer=streamer, do_sample=True, num_return_sequences=2,
                                 max_new_tokens=3)
