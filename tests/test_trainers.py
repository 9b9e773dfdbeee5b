"""DDD and OSD trainers on tiny models: what trains, what stays frozen, and what each method promises."""

import copy
import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from torch.testing import assert_close
from transformers import TrainerCallback

from hf_eu import truncated_copy
from hf_eu.divergences import jsd, kl, mixture_logps
from hf_eu.perturbation import LowRankGaussianPerturbation
from trainers.ddd_config import DDDConfig
from trainers.ddd_trainer import DDDTrainer
from trainers.osd_config import OSDConfig
from trainers.osd_trainer import OSDTrainer
from trainers.partition import partition_dataset

from conftest import tiny_llama

COMMON = dict(report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
              dataloader_num_workers=0)


def response_rows(num_prompts=12, num_responses=3, seed=0, teacher=None, top_k=0):
    """Synthetic DDD data: random prompts and responses, optionally with the teacher's top-k log-probs."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for prompt_id in range(num_prompts):
        prompt = torch.randint(3, 64, (int(torch.randint(3, 6, (1,), generator=generator)),), generator=generator)
        for slot in range(num_responses):
            response = torch.randint(3, 64, (int(torch.randint(4, 9, (1,), generator=generator)),), generator=generator)
            ids = torch.cat([prompt, response])
            row = {"prompt_id": prompt_id, "response_slot": slot, "input_ids": ids.tolist(),
                   "prompt_length": len(prompt)}
            if top_k:
                with torch.no_grad():
                    logps = teacher(ids[None]).logits[0].float().log_softmax(-1)[len(prompt) - 1 : -1]  # (R, V)
                values, indices = logps.topk(top_k, dim=-1)
                row.update(teacher_topk_ids=indices.tolist(), teacher_topk_logps=values.tolist())
            rows.append(row)
    return Dataset.from_list(rows)


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed(before, model):
    return {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}


def freeze_embeddings_and_head(model):
    model.get_input_embeddings().requires_grad_(False)
    model.get_output_embeddings().requires_grad_(False)


@pytest.fixture()
def partitioned(target):
    return partition_dataset(response_rows(teacher=target, top_k=8), num_prompt_groups=1, num_response_slots=3, seed=0)


@pytest.mark.parametrize("mode", ["live_teacher", "stored_topk", "cross_entropy"])
def test_ddd_trains_the_draft_on_its_partition_only(tmp_path, target, partitioned, mode):
    draft = truncated_copy(target, 1)
    freeze_embeddings_and_head(draft)
    data = partitioned if mode == "stored_topk" else partitioned.remove_columns(["teacher_topk_ids",
                                                                                 "teacher_topk_logps"])
    args = DDDConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                     loss="cross_entropy" if mode == "cross_entropy" else "forward_kl", partition_index=2,
                     num_prompt_groups=1, num_response_slots=3, **COMMON)
    before, target_before = snapshot(draft), snapshot(target)
    trainer = DDDTrainer(model=draft, args=args, train_dataset=data,
                         teacher=target if mode == "live_teacher" else None)
    assert set(trainer.train_dataset["partition"]) == {2} and len(trainer.train_dataset) == 12
    trainer.train()
    moved = changed(before, draft)
    assert moved and all("layers.0" in name or "norm" in name for name in moved), moved
    assert not changed(target_before, target), "the teacher must stay frozen"
    assert torch.equal(before["lm_head.weight"], draft.lm_head.weight), "frozen head moved"


def test_ddd_lora_adapters_on_a_shared_base(tmp_path, target, partitioned):
    base = truncated_copy(target, 1)
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base, lora, adapter_name="draft_0")
    model.add_adapter("draft_1", lora)
    for k in (0, 1):
        model.set_adapter(f"draft_{k}")
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = DDDConfig(output_dir=str(tmp_path / str(k)), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-2, partition_index=k, num_prompt_groups=1, num_response_slots=3, **COMMON)
        DDDTrainer(model=model, args=args, train_dataset=partitioned).train()
        moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
        assert moved and all(f"draft_{k}" in n and "lora_" in n for n in moved), moved


def mean_jsd_between(drafts, input_ids):
    with torch.no_grad():
        logps = torch.stack([d(input_ids).logits.float().log_softmax(-1) for d in drafts])  # (K, B, L, V)
    return jsd(logps).mean().item()


def train_drafts(tmp_path, start, data, partition_indices, steps=25):
    drafts = []
    for k, index in enumerate(partition_indices):
        draft = copy.deepcopy(start)
        args = DDDConfig(output_dir=str(tmp_path / f"d{k}"), max_steps=steps, per_device_train_batch_size=4,
                         learning_rate=2e-2, loss="cross_entropy", partition_index=index, num_prompt_groups=3,
                         num_response_slots=1, seed=k, **COMMON)
        DDDTrainer(model=draft, args=args, train_dataset=data).train()
        drafts.append(draft.eval())
    return drafts


def test_ddd_drafts_are_more_diverse_than_drafts_trained_on_identical_data(tmp_path, target):
    data = partition_dataset(response_rows(num_prompts=12, num_responses=1, seed=1), num_prompt_groups=3,
                             num_response_slots=1, seed=0)
    start = tiny_llama(seed=5, hidden_size=16, num_layers=1)
    held_out = torch.tensor(response_rows(num_prompts=4, num_responses=1, seed=99)["input_ids"][0])[None]
    ddd = train_drafts(tmp_path / "ddd", start, data, partition_indices=[0, 1, 2])
    idd = train_drafts(tmp_path / "idd", start, data, partition_indices=[0, 0, 0])  # same data, same seeds 0..2
    ddd_jsd, idd_jsd = mean_jsd_between(ddd, held_out), mean_jsd_between(idd, held_out)
    assert ddd_jsd > 2 * idd_jsd, (ddd_jsd, idd_jsd)


def bma_logps(teacher, input_ids, config, samples=64):
    perturbation = LowRankGaussianPerturbation(teacher, config=config)
    members = []
    with torch.no_grad():
        for seed in range(10_000, 10_000 + samples):
            with perturbation.apply(seed):
                members.append(teacher(input_ids).logits.float().log_softmax(-1))
    return mixture_logps(torch.stack(members))  # (B, L, V)


def test_osd_proxy_approaches_the_bayesian_model_average(tmp_path):
    teacher = tiny_llama(seed=0)
    fixed = {"input_ids": [1, 5, 9, 13, 17, 21, 25, 29, 33, 37], "prompt_length": 1}
    data = Dataset.from_list([fixed] * 8)
    proxy = tiny_llama(seed=7)
    args = OSDConfig(output_dir=str(tmp_path), max_steps=150, per_device_train_batch_size=2, learning_rate=1e-2,
                     perturbation_rank=4, perturbation_sigma=1.0, **COMMON)
    before_teacher = snapshot(teacher)
    OSDTrainer(model=proxy, args=args, train_dataset=data, teacher=teacher).train()
    assert not changed(before_teacher, teacher), "the teacher must be restored after every perturbation"
    input_ids = torch.tensor([fixed["input_ids"]])
    bma = bma_logps(teacher, input_ids, args.perturbation_config())[:, :-1]
    with torch.no_grad():
        proxy_logps = proxy(input_ids).logits.float().log_softmax(-1)[:, :-1]
        teacher_logps = teacher(input_ids).logits.float().log_softmax(-1)[:, :-1]
    to_bma, to_teacher = kl(bma, proxy_logps).mean().item(), kl(teacher_logps, proxy_logps).mean().item()
    assert kl(bma, teacher_logps).mean() > 0.05, "the test needs a BMA visibly different from the teacher"
    assert to_bma < 0.6 * to_teacher, (to_bma, to_teacher)
    # forward KL ends 0.09-0.10 from the BMA (perturbation seeds 0-3), reverse KL 0.19-0.23: only the former passes
    assert to_bma < 0.14, f"the proxy ends {to_bma:.3f} from the BMA; forward KL reaches 0.10 (reverse KL: 0.23)"


def test_osd_noise_is_fresh_per_micro_batch_and_deterministic(tmp_path, target):
    data = Dataset.from_list([{"input_ids": [1, 5, 9, 13], "prompt_length": 1}] * 4)
    args = OSDConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=1,
                     gradient_accumulation_steps=2, **COMMON)
    trainer = OSDTrainer(model=tiny_llama(seed=3), args=args, train_dataset=data, teacher=target)
    seeds = []
    for step in (0, 0, 1, 1):
        trainer.state.global_step = step
        seeds.append(trainer.noise_seed())
    assert seeds == [0, 1, 2, 3]
    trainer.args.noise_per = "step"
    trainer.state.global_step = 5
    assert trainer.noise_seed() == trainer.noise_seed() == 10


def test_gradient_accumulation_matches_one_big_batch(tmp_path, target):
    """num_items_in_batch: 2 micro-batches of 2 rows give the update of 1 batch of 4, with unequal token counts."""
    data = partition_dataset(response_rows(num_prompts=4, num_responses=1, seed=3), 1, 1)
    results = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        draft = tiny_llama(seed=9, hidden_size=8, num_layers=1)
        args = DDDConfig(output_dir=str(tmp_path / str(batch_size)), max_steps=1, per_device_train_batch_size=batch_size,
                         gradient_accumulation_steps=accumulation, learning_rate=0.5, optim="sgd",
                         loss="cross_entropy", num_prompt_groups=1, num_response_slots=1, lr_scheduler_type="constant",
                         **COMMON)
        DDDTrainer(model=draft, args=args, train_dataset=data).train()
        results.append(snapshot(draft))
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], atol=1e-6, rtol=1e-5)


def test_osd_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, target):
    data = Dataset.from_list([{"input_ids": [1, 5, 9, 13, 17, 21], "prompt_length": 2}] * 8)

    class StopAfterTwoSteps(TrainerCallback):  # the "interruption": training ends right after checkpoint-2
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True

    def run(output_dir, callbacks=(), resume=None):
        proxy = tiny_llama(seed=4, hidden_size=8, num_layers=1)
        args = OSDConfig(output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=2,
                         learning_rate=1e-2, save_strategy="steps", save_steps=2, report_to=[], use_cpu=True,
                         disable_tqdm=True, logging_strategy="no")
        OSDTrainer(model=proxy, args=args, train_dataset=data, teacher=target,
                   callbacks=list(callbacks)).train(resume_from_checkpoint=resume)
        return snapshot(proxy)

    uninterrupted = run(tmp_path / "a")
    interrupted = run(tmp_path / "b", callbacks=[StopAfterTwoSteps()])
    resumed = run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-2"))
    assert any(not torch.equal(interrupted[n], uninterrupted[n]) for n in uninterrupted)
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name])


def test_bad_input_is_refused_before_training(tmp_path, target, partitioned):
    args = DDDConfig(output_dir=str(tmp_path), max_steps=1, num_prompt_groups=1, num_response_slots=3, **COMMON)
    odd_vocab = tiny_llama(seed=1, vocab_size=80)
    with pytest.raises(ValueError, match="vocabulary"):
        DDDTrainer(model=odd_vocab, args=args, train_dataset=partitioned, teacher=target)
    with pytest.raises(ValueError, match="empty"):
        DDDTrainer(model=truncated_copy(target, 1), args=args, train_dataset=partitioned.select([]))
    with pytest.raises(ValueError, match="no `partition` column"):
        DDDTrainer(model=truncated_copy(target, 1), args=args, train_dataset=response_rows())
    with pytest.raises(ValueError, match="partitioned 1x3 but the config says 2x3"):
        DDDTrainer(model=truncated_copy(target, 1), train_dataset=partitioned,
                   args=DDDConfig(output_dir=str(tmp_path), num_prompt_groups=2, num_response_slots=3, **COMMON))
    with pytest.raises(ValueError, match="needs the teacher"):
        DDDTrainer(model=truncated_copy(target, 1), args=args,
                   train_dataset=partitioned.remove_columns(["teacher_topk_ids", "teacher_topk_logps"]))
    with pytest.raises(ValueError, match="partition_index"):
        DDDConfig(output_dir=str(tmp_path), partition_index=6, num_prompt_groups=2, num_response_slots=3)
    quantized = tiny_llama(seed=0)
    layer = quantized.model.layers[0].self_attn.q_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="quantized"):
        OSDTrainer(model=tiny_llama(seed=2), args=OSDConfig(output_dir=str(tmp_path), **COMMON),
                   train_dataset=Dataset.from_list([{"input_ids": [1, 2, 3]}]), teacher=quantized)
    with pytest.raises(ValueError, match="noise_per"):
        OSDConfig(output_dir=str(tmp_path), noise_per="epoch")


# ------------------------------------------------------------------------- losses against float64 brute force
# A vocabulary of 8 tokens (pad 0, bos 1, eos 2) so the float64 loops are cheap; rows of unequal length and unequal
# prompt length, so the batch has right padding, masked prompt positions and a first scored column > 0.
SMALL_VOCAB = 8
FIXED_ROWS = [([1, 3, 4, 5, 6, 7], 2), ([1, 5, 3, 3, 7, 4, 6, 5], 3), ([1, 6, 7, 3], 1), ([1, 4, 4, 6, 5], 2)]
NUM_TOKENS = sum(len(ids) - prompt_length for ids, prompt_length in FIXED_ROWS)  # 15 response tokens


def small_llama(seed, **kwargs):
    return tiny_llama(seed=seed, vocab_size=SMALL_VOCAB, **kwargs)


def fixed_rows(teacher=None, top_k=0):
    """FIXED_ROWS as data rows; with `top_k`, the teacher's stored top-k log-probs (entry j: response token j)."""
    rows = []
    for index, (ids, prompt_length) in enumerate(FIXED_ROWS):
        row = {"prompt_id": index, "response_slot": 0, "input_ids": ids, "prompt_length": prompt_length}
        if top_k:
            with torch.no_grad():
                logps = teacher(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (L, V)
            values, indices = logps[prompt_length - 1 : len(ids) - 1].topk(top_k, dim=-1)  # (R, k)
            row.update(teacher_topk_ids=indices.tolist(), teacher_topk_logps=values.tolist())
        rows.append(row)
    return rows


def probs64(model, ids):
    """Float64 next-token probabilities of one unpadded row, as lists: entry t is the distribution of token t + 1."""
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        return model64(torch.tensor([ids])).logits[0].softmax(-1).tolist()  # (L, V)


def brute_token_kls(rows, teacher_probs, student_probs, reverse=False):
    """Per-token KL(teacher ‖ student) (or the reverse) by Python loops: the logits at t - 1 predict token t.

    With stored top-k rows (`teacher_probs` None) the teacher is its top-k log-probs renormalised over the k ids and
    the student is its full-vocabulary probability of those ids, as `DDDTrainer` defines the loss.
    """
    losses = []
    for b, row in enumerate(rows):
        ids, prompt_length = row["input_ids"], row["prompt_length"]
        for t in range(prompt_length, len(ids)):
            q = student_probs[b][t - 1]
            if teacher_probs is None:
                j = t - prompt_length  # the stored entry of response token j
                top_ids, top_logps = row["teacher_topk_ids"][j], row["teacher_topk_logps"][j]
                total = sum(math.exp(v) for v in top_logps)
                p = [math.exp(v) / total for v in top_logps]
                q = [q[i] for i in top_ids]
            else:
                p = teacher_probs[b][t - 1]
            if reverse:
                p, q = q, p
            losses.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0))
    return losses


def small_ddd_trainer(tmp_path, student, rows, teacher=None, **config):
    data = partition_dataset(Dataset.from_list(rows), num_prompt_groups=1, num_response_slots=1)
    args = DDDConfig(output_dir=str(tmp_path), loss="forward_kl", num_prompt_groups=1, num_response_slots=1,
                     **config, **COMMON)
    return DDDTrainer(model=student, args=args, train_dataset=data, teacher=teacher)


@pytest.mark.parametrize("source", ["live_teacher", "stored_topk"])
def test_ddd_loss_is_forward_kl_teacher_to_student_by_brute_force(tmp_path, source):
    teacher, student = small_llama(seed=0), small_llama(seed=3, hidden_size=8, num_layers=1)
    rows = fixed_rows(teacher, top_k=3) if source == "stored_topk" else fixed_rows()
    trainer = small_ddd_trainer(tmp_path, student, rows, teacher=teacher if source == "live_teacher" else None)
    batch = trainer.data_collator(rows)
    student_probs = [probs64(student, row["input_ids"]) for row in rows]
    teacher_probs = [probs64(teacher, row["input_ids"]) for row in rows] if source == "live_teacher" else None
    forward = brute_token_kls(rows, teacher_probs, student_probs)
    reverse = sum(brute_token_kls(rows, teacher_probs, student_probs, reverse=True))
    assert len(forward) == NUM_TOKENS
    assert abs(sum(forward) - reverse) > 0.05 * sum(forward), "the test needs KL's direction to be visible"
    # the accumulated batch holds more tokens than this micro-batch: the sum is divided by the whole count
    loss = trainer.compute_loss(student, batch, num_items_in_batch=torch.tensor(40))
    assert_close(loss.double(), torch.tensor(sum(forward) / 40, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    mean = trainer.compute_loss(student, batch)  # evaluation: the mean over this batch's tokens
    assert_close(mean.double(), torch.tensor(sum(forward) / len(forward), dtype=torch.float64), rtol=1e-5, atol=1e-7)


def test_ddd_stored_topk_over_the_whole_vocabulary_equals_the_live_teacher(tmp_path):
    """With k = V the stored log-probs are the teacher's whole distribution: both sources give one loss."""
    teacher, student = small_llama(seed=0), small_llama(seed=3, hidden_size=8, num_layers=1)
    rows = fixed_rows(teacher, top_k=SMALL_VOCAB)
    stored = small_ddd_trainer(tmp_path / "stored", student, rows)
    live = small_ddd_trainer(tmp_path / "live", student, rows, teacher=teacher)
    batch = stored.data_collator(rows)
    count = torch.tensor(NUM_TOKENS)
    assert_close(stored.compute_loss(student, batch, num_items_in_batch=count),
                 live.compute_loss(student, batch, num_items_in_batch=count), rtol=1e-5, atol=1e-6)


def small_osd_trainer(tmp_path, teacher, student, rows, **config):
    args = OSDConfig(output_dir=str(tmp_path), perturbation_rank=2, perturbation_sigma=0.5, perturbation_seed=100,
                     **config, **COMMON)
    return OSDTrainer(model=student, args=args, train_dataset=Dataset.from_list(rows), teacher=teacher)


def perturbed_probs64(teacher, config, seed, rows):
    """Float64 probabilities of the teacher carrying the perturbation of `seed`, one list per row."""
    with LowRankGaussianPerturbation(teacher, config=config).apply(seed):
        return [probs64(teacher, row["input_ids"]) for row in rows]


def test_osd_loss_is_forward_kl_from_the_teacher_perturbed_with_the_step_seed(tmp_path):
    teacher, student = small_llama(seed=0), small_llama(seed=3, hidden_size=8, num_layers=1)
    rows = fixed_rows()
    trainer = small_osd_trainer(tmp_path, teacher, student, rows, gradient_accumulation_steps=2)
    batch = trainer.data_collator(rows)
    config = trainer.args.perturbation_config()
    student_probs = [probs64(student, row["input_ids"]) for row in rows]
    before = snapshot(teacher)
    # step 3, micro-batches 0 and 1 of 2: seeds perturbation_seed + 3 * 2 + micro; evaluation: perturbation_seed - 1
    trainer.state.global_step = 3
    student.train()
    losses = [trainer.compute_loss(student, batch, num_items_in_batch=torch.tensor(36)) for _ in range(2)]
    student.eval()
    losses.append(trainer.compute_loss(student, batch))
    assert not changed(before, teacher), "the teacher must be restored after every perturbation"
    expected = []
    for seed, divisor in ((106, 36), (107, 36), (99, NUM_TOKENS)):
        teacher_probs = perturbed_probs64(teacher, config, seed, rows)
        forward = sum(brute_token_kls(rows, teacher_probs, student_probs))
        reverse = sum(brute_token_kls(rows, teacher_probs, student_probs, reverse=True))
        assert abs(forward - reverse) > 0.05 * forward, "KL's direction must be visible"
        expected.append(forward / divisor)
    assert_close(torch.stack(losses).double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    unperturbed = sum(brute_token_kls(rows, [probs64(teacher, r["input_ids"]) for r in rows], student_probs)) / 36
    assert min(abs(e - unperturbed) for e in expected[:2]) > 1e-3 and abs(expected[0] - expected[1]) > 1e-3, \
        "each micro-batch must see its own perturbation, not the plain teacher"


# ------------------------------------------------------------------------- several processes, emulated
@pytest.fixture()
def two_processes(monkeypatch):
    """`emulate(rank)`: from then on, process `rank` of 2, as `accelerate launch --num_processes 2` sets them."""
    from accelerate import Accelerator

    def emulate(rank):
        for config in (OSDConfig, DDDConfig):
            monkeypatch.setattr(config, "process_index", property(lambda self: rank))
        monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))

    return emulate


def test_osd_processes_draw_distinct_noise_seeds(tmp_path, target, two_processes):
    data = Dataset.from_list([{"input_ids": [1, 5, 9, 13], "prompt_length": 1}] * 4)
    args = OSDConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=1,
                     gradient_accumulation_steps=2, perturbation_seed=7, **COMMON)
    trainer = OSDTrainer(model=tiny_llama(seed=3), args=args, train_dataset=data, teacher=target)
    steps = [*range(50), *range(10_000, 10_050)]  # early steps and a long run's
    seeds = {}
    for rank in (0, 1):
        two_processes(rank)
        seeds[rank] = []
        for step in steps:
            for _ in range(2):  # the micro-batches of a step
                trainer.state.global_step = step
                seeds[rank].append(trainer.noise_seed())
    assert seeds[0][:4] == [7, 8, 9, 10], "process 0 keeps the one-process schedule"
    for rank in (0, 1):
        assert len(set(seeds[rank])) == len(seeds[rank]), "a process never reuses a perturbation"
    assert not set(seeds[0]) & set(seeds[1]), "two processes must never draw the same perturbation"
    # the same holds for one perturbation per step
    trainer.args.noise_per = "step"
    per_step = {}
    for rank in (0, 1):
        two_processes(rank)
        trainer.state.global_step = 4
        per_step[rank] = {trainer.noise_seed(), trainer.noise_seed()}
    assert len(per_step[0]) == len(per_step[1]) == 1 and per_step[0] != per_step[1]


def halves(rows):
    return rows[::2], rows[1::2]


def test_two_processes_update_like_one_process_with_the_whole_batch(tmp_path, two_processes):
    """DDP averages the processes' gradients; each loss divides by the gathered token count and is scaled by the
    number of processes, so the update equals one process's on the whole batch (the same teacher everywhere)."""
    teacher, student = small_llama(seed=0), small_llama(seed=3, hidden_size=8, num_layers=1)
    rows = fixed_rows()
    trainer = small_ddd_trainer(tmp_path, student, rows, teacher=teacher)
    total = torch.tensor(NUM_TOKENS)  # what `_get_num_items_in_batch` gathers over the processes

    def loss_and_grads(part):
        student.zero_grad()
        loss = trainer.compute_loss(student, trainer.data_collator(part), num_items_in_batch=total)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in student.parameters()]

    whole, whole_grads = loss_and_grads(rows)  # one process
    parts = []
    for rank, part in enumerate(halves(rows)):
        two_processes(rank)
        parts.append(loss_and_grads(part))
    assert_close((parts[0][0] + parts[1][0]) / 2, whole)
    for a, b, expected in zip(parts[0][1], parts[1][1], whole_grads):
        assert_close((a + b) / 2, expected, rtol=1e-5, atol=1e-7)


def test_osd_two_process_objective_is_the_token_mean_of_each_process_own_perturbation(tmp_path, two_processes):
    teacher, student = small_llama(seed=0), small_llama(seed=3, hidden_size=8, num_layers=1)
    rows = fixed_rows()
    trainers = [small_osd_trainer(tmp_path / str(rank), teacher, student, rows) for rank in (0, 1)]  # one per process
    config = trainers[0].args.perturbation_config()
    student.train()
    losses, expected = [], 0.0
    for rank, part in enumerate(halves(rows)):
        two_processes(rank)
        trainers[rank].state.global_step = 2
        batch = trainers[rank].data_collator(part)
        losses.append(trainers[rank].compute_loss(student, batch, num_items_in_batch=torch.tensor(NUM_TOKENS)))
        seed = 100 + 1_000_003 * rank + 2  # perturbation_seed + 1_000_003 · process index + step · GA + micro
        student_probs = [probs64(student, row["input_ids"]) for row in part]
        teacher_probs = perturbed_probs64(teacher, config, seed, part)
        expected += sum(brute_token_kls(part, teacher_probs, student_probs)) / NUM_TOKENS
    assert_close(((losses[0] + losses[1]) / 2).double(), torch.tensor(expected, dtype=torch.float64),
                 rtol=1e-5, atol=1e-7)
