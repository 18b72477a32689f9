"""HF generation backend on a tiny model: samples, and log-probs that match a plain forward pass."""

import numpy as np
import torch

from policy.generation import HFGenerator
from policy.logprobs import token_logprobs
from tests.tiny_models import char_tokenizer, tiny_llama


def test_samples_carry_exact_behaviour_and_reference_logprobs():
    tokenizer = char_tokenizer()
    policy, reference = tiny_llama(0), tiny_llama(1)
    gen = HFGenerator(policy, tokenizer, reference, temperature=0.7, max_new_tokens=12)
    prompts = [gen.prompt_ids([{"role": "user", "content": q}]) for q in ("What is 2+2?", "Hi")]
    assert len(prompts[0]) > len(prompts[1])  # different lengths: left padding is exercised
    torch.manual_seed(0)
    groups = gen.sample(prompts, n=3)
    assert [len(g) for g in groups] == [3, 3]
    for prompt, group in zip(prompts, groups, strict=True):
        for c in group:
            assert c.token_ids.size == c.logprobs.size == c.ref_logprobs.size > 0
            assert (c.finish_reason == "stop") == (c.token_ids[-1] == tokenizer.eos_token_id)
            seq = torch.tensor([prompt + c.token_ids.tolist()])  # alone, unpadded
            for model, got in ((policy, c.logprobs), (reference, c.ref_logprobs)):
                logits = model(seq).logits[:, len(prompt) - 1 : -1]
                expected = token_logprobs(logits, seq[:, len(prompt) :], 0.7)[0].detach().numpy()
                np.testing.assert_allclose(got, expected, atol=1e-4)
