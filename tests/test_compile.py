"""torch.compile on the wrapped target: the recipe the README gives compiles what `generate` runs, same tokens and EU."""

import torch
from torch._dynamo.testing import CompileCounter

from hf_eu import UncertaintyAwareModelForCausalLM

from conftest import tiny_llama


def test_compiling_the_targets_forward_is_what_generate_runs():
    target = tiny_llama(0)
    model = UncertaintyAwareModelForCausalLM(target, [tiny_llama(10 + k, num_layers=1) for k in range(2)],
                                             tiny_llama(20, num_layers=1))
    ids = torch.tensor([[1, 5, 9, 13], [0, 7, 3, 2]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    counter = CompileCounter()  # a backend that counts the graphs dynamo hands it, then runs them eagerly
    model.target.forward = torch.compile(model.target.forward, backend=counter, dynamic=True)  # the README's recipe
    compiled = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert counter.frame_count >= 1, "generate did not call the compiled forward"
    assert torch.equal(compiled.sequences, reference.sequences)
    torch.testing.assert_close(compiled.epistemic_uncertainty, reference.epistemic_uncertainty)
    torch._dynamo.reset()

