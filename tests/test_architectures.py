"""Every architecture family: tokens identical to the target's, EU equal to a cache-free full forward in float64.

Recurrent and hybrid models (Mamba, Mamba2, Jamba, RecurrentGemma, LFM2) keep caches that cannot continue in
multi-token chunks; scoring detects them and runs those cache-free (`hf_eu._cache.continues_in_chunks`).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from torch.testing import assert_close

from hf_eu import UncertaintyAwareModelForCausalLM, get_estimator

torch.set_num_threads(1)
VOCAB = 64
_COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_ATTENTION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _ATTENTION),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _ATTENTION),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_ATTENTION, "head_dim": 8}),
    "mistral": ("MistralConfig", "MistralForCausalLM", _ATTENTION),
    "gemma2_sliding": ("Gemma2Config", "Gemma2ForCausalLM", {**_ATTENTION, "head_dim": 8, "sliding_window": 3}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**_ATTENTION, "head_dim": 8, "sliding_window": 3}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**_ATTENTION, "num_key_value_heads": 2}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=16, n_layer=2, n_head=2, n_positions=64)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {**_ATTENTION, "num_key_value_heads": 2}),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                               word_embed_proj_dim=16, max_position_embeddings=64)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2)),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=16, n_layer=2, n_head=2)),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(n_embd=16, n_layer=2, n_head=2, n_positions=64)),
    "lfm2": ("Lfm2Config", "Lfm2ForCausalLM", {**_ATTENTION, "layer_types": ["conv", "full_attention"]}),
    "mamba": ("MambaConfig", "MambaForCausalLM", dict(hidden_size=16, num_hidden_layers=2, state_size=4, expand=2,
                                                     conv_kernel=2)),
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM", dict(hidden_size=16, num_hidden_layers=2, state_size=4, expand=2,
                                                        conv_kernel=2, num_heads=4, head_dim=8, n_groups=1,
                                                        chunk_size=4)),
    "jamba": ("JambaConfig", "JambaForCausalLM", {**_ATTENTION, "attn_layer_period": 2, "attn_layer_offset": 1,
                                                  "expert_layer_period": 2, "expert_layer_offset": 1, "num_experts": 2,
                                                  "mamba_d_state": 4, "mamba_expand": 2, "mamba_dt_rank": 4}),
    "recurrent_gemma": ("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM",
                        dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, lru_width=16, attention_window_size=8,
                             block_types=["recurrent", "attention"], head_dim=8)),
}


def _build(family: str, seed: int):
    config_name, model_name, extra = FAMILIES[family]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = getattr(transformers, config_name)(**_COMMON, **extra)
        config.initializer_range = 0.5 if hasattr(config, "initializer_range") else None
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config).eval()
    model.generation_config = transformers.GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return model


def _full_forward_logps(model, ids, mask, positions):
    """float64 log-probs `(B, L, V)` of one cache-free forward (float32 where a kernel has no float64, e.g. Jamba's
    experts). A left-padded row whose float64 forward is NaN (transformers' fully masked padding rows) is run alone,
    without its padding."""
    try:
        with torch.no_grad():
            logits = model.double()(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    except RuntimeError:
        model.float()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits.double()
    for row in torch.isnan(logits).flatten(1).any(-1).nonzero().flatten().tolist():
        start = int((mask[row] == 0).sum())
        with torch.no_grad():
            alone = model(input_ids=ids[row : row + 1, start:], use_cache=False).logits
        logits[row] = torch.nan
        logits[row, start:] = alone[0].double()
    model.float()
    return logits.log_softmax(-1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tokens_identical_and_eu_equals_a_full_forward(family):
    target, draft, proxy = (_build(family, seed) for seed in (0, 1, 2))
    model = UncertaintyAwareModelForCausalLM.from_pretrained(target, drafts=[draft, _build(family, 3)], proxy=proxy)
    batch = {"input_ids": torch.tensor([[1, 5, 9, 13, 17, 21], [0, 0, 1, 7, 11, 3]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])}
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                             min_new_tokens=6)
        plain = target.generate(**batch, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert torch.equal(out.sequences, plain)
    # the reference: every model in float64, one full forward over the whole sequence, no cache
    mask = torch.cat([batch["attention_mask"], torch.ones(2, 6, dtype=torch.long)], 1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    logps = [_full_forward_logps(part, out.sequences, mask, positions)[:, 5:-1].flatten(0, 1)  # (B*T, V)
             for part in (*model.drafts, model.proxy)]
    reference = get_estimator("hf_eu")(draft_logps=torch.stack(logps[:2]), reference_logps=logps[2]).score.view(2, 6).double()
    assert_close(out.epistemic_uncertainty.double(), reference, atol=1e-5, rtol=1e-5)
    scored = model.estimate_uncertainty(out.sequences, mask, prompt_length=6, chunk_size=2)  # chunked after a prefill
    assert_close(scored.epistemic_uncertainty.double(), reference, atol=1e-5, rtol=1e-5)
