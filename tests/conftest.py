"""Tiny random models built from configs in code: no downloads, seconds to run.

The target is a 2-layer Llama (hidden 16, vocab 64); drafts and proxy are smaller Llamas with the same
vocabulary, each seeded differently so their distributions disagree. Weights are initialised with a
large std so the distributions are far from uniform and the uncertainty values are not all tiny.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB_SIZE = 64
EOS_ID = 2
PAD_ID = 0
BOS_ID = 1


def tiny_llama(seed: int, hidden_size: int = 16, num_layers: int = 2, vocab_size: int = VOCAB_SIZE) -> LlamaForCausalLM:
    """A random Llama with `num_layers` layers; same seed, same weights."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        initializer_range=0.5,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return model


@pytest.fixture(scope="session")
def target():
    return tiny_llama(seed=0)


@pytest.fixture(scope="session")
def drafts():
    return [tiny_llama(seed=10 + k, hidden_size=8, num_layers=1) for k in range(3)]


@pytest.fixture(scope="session")
def proxy():
    return tiny_llama(seed=20, hidden_size=8, num_layers=1)


@pytest.fixture()
def eu_model(target, drafts, proxy):
    from hf_eu import UncertaintyAwareModelForCausalLM

    return UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=drafts, proxy=proxy)


@pytest.fixture()
def batch():
    """Two prompts, the second left-padded by 2 tokens."""
    input_ids = torch.tensor([[1, 5, 9, 13, 17, 21], [PAD_ID, PAD_ID, 1, 7, 11, 3]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def tiny_gpt2(seed: int, hidden_size: int = 16, num_layers: int = 2) -> GPT2LMHeadModel:
    """A random GPT-2: learned absolute position embeddings, so wrong position ids under left padding show (rotary
    Llamas only see relative positions and hide them). Same vocabulary and special ids as `tiny_llama`."""
    config = GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=2, vocab_size=VOCAB_SIZE, n_positions=64,
                        initializer_range=0.5, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return model


@pytest.fixture(scope="session")
def gpt2_models():
    """(target, drafts, proxy), all tiny GPT-2s."""
    drafts = [tiny_gpt2(seed=10 + k, hidden_size=8, num_layers=1) for k in range(3)]
    return tiny_gpt2(seed=0), drafts, tiny_gpt2(seed=20, hidden_size=8, num_layers=1)


@pytest.fixture()
def gpt2_eu_model(gpt2_models):
    from hf_eu import UncertaintyAwareModelForCausalLM

    target, drafts, proxy = gpt2_models
    return UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=drafts, proxy=proxy)
