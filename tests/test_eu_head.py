"""The distilled EU head: its features against plain forwards, its formulas against float64 loops, generate's
recorded features against teacher forcing, the composite round trip and the trainer."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from hf_eu import UncertaintyAwareModelForCausalLM
from hf_eu.eu_features import (TargetFeatureRecorder, TargetFeatures, feature_layers, feature_names, output_features,
                               teacher_forced_features)
from hf_eu.eu_head import EUHead, fisher_variances

from conftest import PAD_ID, tiny_llama

torch.set_num_threads(1)


def _head(target, seed=0, num_directions=3, proxy=False):
    """A random head for `target` (with `proxy`, a proxy head: its inputs end with the proxy's entropy)."""
    from hf_eu.eu_head import PROXY_ENTROPY

    torch.manual_seed(seed)
    names = feature_names(target) + ([PROXY_ENTROPY] if proxy else [])
    head = EUHead(names, target.config.hidden_size, num_directions=num_directions, hidden_sizes=(8,),
                  top_k=5).attach(target)
    with torch.no_grad():
        for parameter in head.mlp.parameters():
            parameter.normal_(0, 0.5)
        head.input_mean.normal_(0, 1)
    return head.eval()


@pytest.fixture()
def head_model(target, drafts, proxy):
    return UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=drafts, proxy=proxy, estimator="eu_head",
                                                            eu_head=_head(target))


def test_output_features_match_float64_loops():
    logits = torch.randn(3, 7, dtype=torch.float64) * 3
    stats, ids, logps = output_features(logits.float(), top_k=4)
    for row in range(3):
        z = sum(math.exp(v) for v in logits[row].tolist())
        p = [math.exp(v) / z for v in logits[row].tolist()]
        ordered = sorted(range(7), key=lambda v: -p[v])
        expected = [-sum(q * math.log(q) for q in p), math.log(p[ordered[0]]),
                    math.log(p[ordered[0]]) - math.log(p[ordered[1]]), math.log(z)]
        assert_close(stats[row].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=1e-5)
        assert ids[row].tolist() == ordered[:4]
        assert_close(logps[row].double(), torch.tensor([math.log(p[v]) for v in ordered[:4]], dtype=torch.float64),
                     atol=1e-5, rtol=1e-5)


def test_fisher_variances_match_float64_loop_and_properties():
    logps = torch.randn(4, 5, dtype=torch.float64)
    values = torch.randn(4, 5, 2, dtype=torch.float64)
    got = fisher_variances(logps, values).double()
    for n in range(4):
        p = [math.exp(v) for v in logps[n].tolist()]
        p = [q / sum(p) for q in p]
        for j in range(2):
            mean = sum(q * values[n, v, j].item() for v, q in enumerate(p))
            expected = sum(q * (values[n, v, j].item() - mean) ** 2 for v, q in enumerate(p))
            assert got[n, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert (got >= 0).all()
    assert_close(fisher_variances(logps, torch.ones(4, 5, 2)), torch.zeros(4, 2), atol=1e-6, rtol=0)  # constant: 0


def _plain_forward_features(model, ids, mask, prompt_length, top_k=64):
    """The features by hand: q/v inputs = input_layernorm of each layer's input hidden state, logits from one forward."""
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    norms = []
    for layer, hidden in zip(model.model.layers, out.hidden_states):
        normed = layer.input_layernorm(hidden).norm(dim=-1).clamp_min(1e-12).log()  # q_proj, v_proj read the same input
        norms += [normed, normed]  # named_modules order: q_proj, then v_proj
    values = torch.stack(norms, -1)[:, prompt_length - 1 : -1]  # (B, T, M): positions predicting new tokens
    stats, ids_, logps = output_features(out.logits[:, prompt_length - 1 : -1], top_k)
    return torch.cat([values, stats], -1), ids_, logps


def test_teacher_forced_features_match_a_plain_forward(target):
    ids = torch.tensor([[PAD_ID, PAD_ID, 1, 7, 11, 3, 9, 4, 5], [1, 5, 9, 13, 17, 21, 8, 6, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])
    got = teacher_forced_features(target, ids, prompt_length=5, attention_mask=mask, chunk_size=2, top_k=6)
    values, topk_ids, topk_logps = _plain_forward_features(target, ids, mask, 5, top_k=6)
    assert got.values.shape == (2, 4, len(feature_names(target)))
    assert_close(got.values, values, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.topk_ids, topk_ids)
    assert_close(got.topk_logps, topk_logps, atol=1e-4, rtol=1e-4)
    assert [n for n, _ in feature_layers(target)] == [f"model.layers.{i}.self_attn.{m}" for i in range(2)
                                                      for m in ("q_proj", "v_proj")]


def _count_calls(model):
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("kwargs", [
    dict(do_sample=False),
    dict(do_sample=True, top_k=0, temperature=1.5),
    dict(do_sample=True, num_return_sequences=2, top_p=0.9),
], ids=["greedy", "sampling", "num_return_sequences"])
def test_generate_records_features_without_a_scoring_pass(head_model, batch, kwargs):
    calls, handle = _count_calls(head_model.target)
    torch.manual_seed(0)
    try:
        out = head_model.generate(**batch, max_new_tokens=6, return_dict_in_generate=True, **kwargs)
    finally:
        handle.remove()
    new = out.sequences.shape[1] - batch["input_ids"].shape[1]
    assert len(calls) == new  # the decoding passes only: no teacher-forced pass after generate
    rows = out.sequences.shape[0]
    mask = torch.cat([batch["attention_mask"].repeat_interleave(rows // 2, 0), torch.ones(rows, new, dtype=torch.long)], 1)
    reference = head_model.estimate_uncertainty(out.sequences, mask, prompt_length=batch["input_ids"].shape[1])
    assert out.uncertainty_mask.any()
    assert_close(out.epistemic_uncertainty, reference.epistemic_uncertainty * out.uncertainty_mask, atol=1e-5, rtol=1e-4)
    assert (out.epistemic_uncertainty[out.uncertainty_mask] > 0).all()
    # the same tokens as the target alone
    torch.manual_seed(0)
    plain = head_model.target.generate(**batch, max_new_tokens=6, **kwargs)
    assert torch.equal(plain, out.sequences)


def test_recorded_features_equal_a_plain_forward(target, batch):
    recorder = TargetFeatureRecorder(target, top_k=5)
    with recorder:
        sequences = target.generate(**batch, max_new_tokens=4, do_sample=False)
    features = recorder.generated(4, 2)
    mask = torch.cat([batch["attention_mask"], torch.ones(2, 4, dtype=torch.long)], 1)
    values, ids, logps = _plain_forward_features(target, sequences, mask, batch["input_ids"].shape[1], top_k=5)
    assert_close(features.values, values, atol=1e-4, rtol=1e-4)
    assert torch.equal(features.topk_ids, ids)
    assert recorder.generated(5, 2) is None  # calls that do not map onto the tokens are refused, not guessed


def test_beam_search_falls_back_to_teacher_forcing(head_model, batch):
    out = head_model.generate(**batch, max_new_tokens=4, num_beams=2, return_dict_in_generate=True)
    width = batch["input_ids"].shape[1]
    mask = torch.cat([batch["attention_mask"], torch.ones(2, out.sequences.shape[1] - width, dtype=torch.long)], 1)
    reference = head_model.estimate_uncertainty(out.sequences, mask, prompt_length=width)
    assert_close(out.epistemic_uncertainty, reference.epistemic_uncertainty * out.uncertainty_mask, atol=1e-5, rtol=1e-4)


def test_left_padding_does_not_change_a_row(head_model):
    alone = torch.tensor([[1, 7, 11, 3]])
    padded = torch.tensor([[PAD_ID, PAD_ID, 1, 7, 11, 3], [1, 5, 9, 13, 17, 21]])
    padded_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    one = head_model.generate(input_ids=alone, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    two = head_model.generate(input_ids=padded, attention_mask=padded_mask, max_new_tokens=5, do_sample=False,
                              return_dict_in_generate=True)
    width = one.epistemic_uncertainty.shape[1]
    assert torch.equal(one.sequences[0, 4:], two.sequences[0, 6 : 6 + width])
    assert_close(one.epistemic_uncertainty[0], two.epistemic_uncertainty[0, :width], atol=1e-4, rtol=1e-4)


def test_composite_round_trip_keeps_the_head(head_model, target, tmp_path, batch):
    head_model.save_pretrained(tmp_path / "composite")
    files = os.listdir(tmp_path / "composite")
    assert "eu_head" in files and "model.safetensors" not in files
    assert sorted(os.listdir(tmp_path / "composite" / "eu_head")) == ["config.json", "model.safetensors"]
    loaded = UncertaintyAwareModelForCausalLM.from_pretrained(tmp_path / "composite", target=target)
    assert loaded.config.estimator == "eu_head" and loaded.config.has_eu_head
    for name, tensor in head_model.eu_head.state_dict().items():
        assert torch.equal(loaded.eu_head.state_dict()[name], tensor)
    first = head_model.generate(**batch, max_new_tokens=4, return_dict_in_generate=True)
    second = loaded.generate(**batch, max_new_tokens=4, return_dict_in_generate=True)
    assert_close(first.epistemic_uncertainty, second.epistemic_uncertainty)


def test_a_composite_without_a_head_refuses_the_estimator(eu_model, batch):
    with pytest.raises(ValueError, match="EU head"):
        eu_model.generate(**batch, max_new_tokens=3, return_dict_in_generate=True, estimator="eu_head")
    with pytest.raises(ValueError, match="EU head"):
        eu_model.estimate_uncertainty(batch["input_ids"], batch["attention_mask"], prompt_length=3, estimator="eu_head")


def test_head_refuses_another_target(target):
    other = tiny_llama(seed=3, hidden_size=8)
    with pytest.raises(ValueError, match="hidden size"):
        _head(target).attach(other)
    with pytest.raises(ValueError, match="features of shape"):
        _head(target)(TargetFeatures(torch.zeros(2, 3), torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5)))


def _training_rows(target, n=96, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (8, 12), generator=generator)
    features = teacher_forced_features(target, ids, prompt_length=2, top_k=5).map(lambda t: t.flatten(0, 1))
    truth = (0.05 * features.values[:, -4].exp().clamp(max=20)).double()  # an EU that depends on the entropy
    return {"values": features.values.numpy(), "topk_ids": features.topk_ids.numpy(),
            "topk_logps": features.topk_logps.numpy(), "ground_truth": truth.numpy(),
            "answer_index": np.repeat(np.arange(8), 10)}


def test_trainer_loss_matches_hand_computation_and_trains_only_the_head(target, tmp_path):
    from trainers.eu_head_config import EUHeadConfig
    from trainers.eu_head_trainer import EUHeadTrainer, batch_features, eu_head_dataset, set_input_statistics

    head = _head(target)
    dataset = eu_head_dataset(_training_rows(target))
    set_input_statistics(head, dataset)
    inputs = batch_features(dataset[:])
    assert_close(head.inputs(inputs).mean(0), head.input_mean, atol=1e-4, rtol=1e-4)
    config = EUHeadConfig(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=32, learning_rate=1e-2,
                          report_to=[], save_strategy="no", log_loss_weight=1.0, raw_loss_weight=100.0, eu_floor=1e-3,
                          use_cpu=True)
    trainer = EUHeadTrainer(model=head, args=config, train_dataset=dataset)
    rows = dataset[:16]
    with torch.no_grad():
        loss = trainer.compute_loss(head, rows)
        s, g = head.log_eu(batch_features(rows)).double(), rows["labels"].double()
        expected = ((s - torch.log(g + 1e-3)) ** 2 + 100.0 * (s.exp() - g) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    target_before = {n: p.detach().clone() for n, p in target.named_parameters()}
    trainer.train()
    assert all(not torch.equal(before[n], p) for n, p in head.named_parameters())
    assert all(torch.equal(target_before[n], p) for n, p in target.named_parameters())


def test_trainer_config_validates():
    from trainers.eu_head_config import EUHeadConfig

    with pytest.raises(ValueError, match="eu_floor"):
        EUHeadConfig(output_dir="unused", eu_floor=0.0, report_to=[])
    with pytest.raises(ValueError, match="log_loss_weight"):
        EUHeadConfig(output_dir="unused", log_loss_weight=0.0, raw_loss_weight=0.0, report_to=[])


def _stream(model, streamer, inputs, **kwargs):
    from threading import Thread

    thread = Thread(target=model.generate, kwargs=dict(**inputs, streamer=streamer, **kwargs))
    thread.start()
    pieces = list(streamer)
    thread.join()
    return [value for piece in pieces for value in piece.eu]


def test_streaming_reads_the_generating_passes(head_model):
    from transformers import AutoTokenizer  # noqa: F401  (the streamers decode with any tokenizer-like object)

    from hf_eu import EUTextIteratorStreamer

    class Digits:  # a minimal tokenizer: every id decodes to its own characters
        def decode(self, ids, **kwargs):
            return "".join(f"<{i}>" for i in ids)

    inputs = {"input_ids": torch.tensor([[1, 7, 11, 3]])}
    calls, handle = _count_calls(head_model.target)
    try:
        streamed = _stream(head_model, EUTextIteratorStreamer(Digits(), head_model), inputs, max_new_tokens=6,
                           min_new_tokens=6, do_sample=False)
    finally:
        handle.remove()
    assert len(calls) == 6  # no pass besides the decoding ones
    reference = head_model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                    return_dict_in_generate=True)
    assert_close(torch.tensor(streamed), reference.epistemic_uncertainty[0], atol=1e-5, rtol=1e-4)
    # assisted decoding: the target's calls cover several tokens, so the streamer hands over to an IncrementalScorer
    assisted = _stream(head_model, EUTextIteratorStreamer(Digits(), head_model), inputs, max_new_tokens=6,
                       min_new_tokens=6, do_sample=False, assistant_draft=0)
    assert_close(torch.tensor(assisted), reference.epistemic_uncertainty[0], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ the proxy head (estimator eu_head_proxy)
def _proxy_head(target, seed=1):
    return _head(target, seed, num_directions=2, proxy=True)


@pytest.fixture()
def proxy_head_model(target, drafts, proxy):
    head = _head(target).set_proxy_head(_proxy_head(target))
    return UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=drafts, proxy=proxy, estimator="eu_head",
                                                            eu_head=head)


def test_proxy_head_reads_the_proxys_entropy(proxy_head_model, batch):
    """eu_head_proxy = proxy_head([features, H(proxy)]), with H from a plain float64 proxy forward, in generate and
    estimate_uncertainty alike; the plain eu_head is unchanged by carrying a proxy head."""
    model = proxy_head_model
    calls, handle = _count_calls(model.target)
    try:
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             estimator="eu_head_proxy")
    finally:
        handle.remove()
    width = batch["input_ids"].shape[1]
    assert len(calls) == out.sequences.shape[1] - width  # the features come from the decoding passes: only the proxy runs
    mask = torch.cat([batch["attention_mask"], torch.ones_like(out.sequences[:, width:])], 1)
    features = teacher_forced_features(model.target, out.sequences, width, attention_mask=mask)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model.proxy(input_ids=out.sequences, attention_mask=mask, position_ids=positions).logits.double()
        logps = logits[:, width - 1 : -1].log_softmax(-1)  # (B, T, V) predicting the new tokens
        proxy_entropy = -(logps.exp() * logps).sum(-1)  # (B, T)
        values = torch.cat([features.values, proxy_entropy.float()[..., None]], -1)  # (B, T, F + 1)
        expected = model.eu_head.proxy_head(TargetFeatures(values.flatten(0, 1), features.topk_ids.flatten(0, 1),
                                                           features.topk_logps.flatten(0, 1))).view(2, -1)
    assert_close(out.epistemic_uncertainty, expected * out.uncertainty_mask, atol=1e-5, rtol=1e-4)
    again = model.estimate_uncertainty(out.sequences, mask, prompt_length=width, estimator="eu_head_proxy")
    assert_close(again.epistemic_uncertainty, expected, atol=1e-5, rtol=1e-4)
    plain = model.generate(**batch, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    bare = UncertaintyAwareModelForCausalLM.from_pretrained(model.target, drafts=list(model.drafts), proxy=model.proxy,
                                                            estimator="eu_head", eu_head=_head(model.target))
    reference = bare.generate(**batch, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(plain.epistemic_uncertainty, reference.epistemic_uncertainty)
    assert not torch.allclose(plain.epistemic_uncertainty, out.epistemic_uncertainty)


def test_score_tokens_reads_recorded_features_instead_of_running_the_target(proxy_head_model, batch):
    from hf_eu import get_estimator, score_tokens_many

    model = proxy_head_model
    width = batch["input_ids"].shape[1]
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(out.sequences[:, width:])], 1)
    features = teacher_forced_features(model.target, out.sequences, width, attention_mask=mask)
    estimators = [get_estimator("eu_head_proxy"), get_estimator("entropy")]
    common = dict(drafts=list(model.drafts), proxy=model.proxy, target=model.target, attention_mask=mask,
                  eu_head=model.eu_head, chunk_size=3)
    computed = score_tokens_many(estimators, out.sequences, width, **common)
    calls, handle = _count_calls(model.target)
    try:
        given = score_tokens_many(estimators[:1], out.sequences, width, target_features=features, **common)
    finally:
        handle.remove()
    assert not calls  # the proxy ran, the target did not
    assert_close(given["eu_head_proxy"].epistemic_uncertainty, computed["eu_head_proxy"].epistemic_uncertainty,
                 atol=1e-5, rtol=1e-4)
    with_target = score_tokens_many(estimators, out.sequences, width, target_features=features, **common)
    assert_close(with_target["entropy"].epistemic_uncertainty, computed["entropy"].epistemic_uncertainty)  # still run
    with pytest.raises(ValueError, match="target_features"):
        score_tokens_many(estimators[:1], out.sequences, width, target_features=features.map(lambda t: t[:, :2]),
                          **common)


@pytest.mark.parametrize("shared_head", [False, True])
def test_streaming_the_proxy_head_equals_generate(proxy_head_model, target, shared_head):
    """Also with a proxy built on the target's own layers, which shares its output head (as the shipped one does):
    the recorder's hooks on that head must not take the proxy's passes for the target's."""
    from hf_eu import EUTextIteratorStreamer
    from hf_eu.truncation import truncated_copy

    if shared_head:
        proxy_head_model.proxy = truncated_copy(target, 1, share_embeddings=True).eval()
        assert proxy_head_model.proxy.get_output_embeddings() is target.get_output_embeddings()

    class Digits:
        def decode(self, ids, **kwargs):
            return "".join(f"<{i}>" for i in ids)

    inputs = {"input_ids": torch.tensor([[1, 7, 11, 3]])}
    args = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    calls, handle = _count_calls(proxy_head_model.target)
    try:
        streamed = _stream(proxy_head_model, EUTextIteratorStreamer(Digits(), proxy_head_model,
                                                                    estimator="eu_head_proxy"), inputs, **args)
    finally:
        handle.remove()
    assert len(calls) == 5  # the decoding passes only: the target's features are read from them, only the proxy runs
    reference = proxy_head_model.generate(**inputs, **args, return_dict_in_generate=True, estimator="eu_head_proxy")
    assert_close(torch.tensor(streamed), reference.epistemic_uncertainty[0], atol=1e-5, rtol=1e-4)


def test_proxy_head_round_trips_and_is_refused_where_it_cannot_work(proxy_head_model, head_model, target, batch,
                                                                   tmp_path):
    model = proxy_head_model
    model.save_pretrained(tmp_path / "composite")
    loaded = UncertaintyAwareModelForCausalLM.from_pretrained(tmp_path / "composite", target=target)
    assert loaded.eu_head.proxy_head is not None
    for name, tensor in model.eu_head.state_dict().items():
        assert torch.equal(loaded.eu_head.state_dict()[name], tensor)
    first = model.generate(**batch, max_new_tokens=3, return_dict_in_generate=True, estimator="eu_head_proxy")
    second = loaded.generate(**batch, max_new_tokens=3, return_dict_in_generate=True, estimator="eu_head_proxy")
    assert_close(first.epistemic_uncertainty, second.epistemic_uncertainty)
    calls, handle = _count_calls(head_model.target)
    try:  # a head without a proxy head: refused before any token is generated
        with pytest.raises(ValueError, match="proxy variant"):
            head_model.generate(**batch, max_new_tokens=3, return_dict_in_generate=True, estimator="eu_head_proxy")
    finally:
        handle.remove()
    assert not calls
    no_proxy = UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=list(model.drafts), estimator="eu_head",
                                                                eu_head=_head(target).set_proxy_head(_proxy_head(target)))
    with pytest.raises(ValueError, match="no proxy was given"):
        no_proxy.estimate_uncertainty(batch["input_ids"], batch["attention_mask"], prompt_length=3,
                                      estimator="eu_head_proxy")
    with pytest.raises(ValueError, match="proxy_entropy"):
        _head(target).set_proxy_head(_head(target, seed=2))  # a head without the proxy column
    with pytest.raises(TypeError, match="proxy head of its own"):
        _head(target).set_proxy_head(_head(target).set_proxy_head(_proxy_head(target)))


def test_proxy_entropy_column_is_the_proxys_entropy_and_is_cached(target, proxy, tmp_path):
    import json

    from trainers.eu_head_data import proxy_entropy_column

    rows = [{"prompt_ids": [1, 7, 11], "answer_ids": [3, 9, 4]}, {"prompt_ids": [1, 5], "answer_ids": []},
            {"prompt_ids": [2, 6, 8, 10], "answer_ids": [12, 14]}]
    (tmp_path / "answers.json").write_text(json.dumps(rows))
    answer_index = np.array([0, 0, 0, 2, 2])
    column = proxy_entropy_column(str(tmp_path), target, proxy, answer_index)
    expected = []
    for row in (rows[0], rows[2]):
        ids = torch.tensor([row["prompt_ids"] + row["answer_ids"]])
        with torch.no_grad():
            logps = proxy(input_ids=ids).logits.double()[0, len(row["prompt_ids"]) - 1 : -1].log_softmax(-1)
        expected += (-(logps.exp() * logps).sum(-1)).tolist()
    np.testing.assert_allclose(column, expected, atol=1e-5)
    calls, handle = _count_calls(proxy)
    try:
        again = proxy_entropy_column(str(tmp_path), target, proxy, answer_index)
    finally:
        handle.remove()
    assert not calls and np.array_equal(again, column)  # read from the cache
    other = tiny_llama(seed=9)
    np.testing.assert_raises(AssertionError, np.testing.assert_allclose,
                             proxy_entropy_column(str(tmp_path), target, other, answer_index), column, 1e-6)
