"""HF generation backend on a tiny model: samples whose behaviour log-probs come from the generation pass, equal
to a separate forward pass; reference log-probs, with LoRA from the policy's own weights with its adapters off.

Tolerance: 1e-5 (float32; the largest difference measured is 4.8e-7).
"""

import numpy as np
import pytest
import torch

from policy.generation import HFGenerator
from policy.logprobs import completions_token_logprobs, token_logprobs
from policy.models import AdaptersDisabled, load_model
from producers.generators import build_generator
from tests.conftest import make_config
from tests.tiny_models import char_tokenizer, saved_tiny_llama, tiny_llama

ATOL = 1e-5


def alone(model, prompt: list[int], completion: np.ndarray, temperature: float) -> np.ndarray:
    """The completion's log-probs from a forward pass over prompt + completion alone, unpadded."""
    seq = torch.tensor([prompt + completion.tolist()])
    with torch.no_grad():
        logits = model(seq).logits[:, len(prompt) - 1 : -1]
    return token_logprobs(logits, seq[:, len(prompt) :], temperature)[0].numpy()


def test_behaviour_logprobs_of_the_generation_pass_equal_a_separate_forward_pass():
    tokenizer = char_tokenizer()
    policy, reference = tiny_llama(0), tiny_llama(1)
    gen = HFGenerator(policy, tokenizer, reference, temperature=0.7, max_new_tokens=40)
    prompts = [gen.prompt_ids([{"role": "user", "content": q}]) for q in ("What is 2+2?", "Hi")]
    assert len(prompts[0]) > len(prompts[1])  # different lengths: left padding is exercised
    torch.manual_seed(0)
    groups = gen.sample(prompts, n=6)
    assert [len(g) for g in groups] == [6, 6]
    completions = [c for g in groups for c in g]
    # some end at EOS while others run on: generate() pads those, and what follows EOS is cut off
    assert {c.finish_reason for c in completions} == {"stop", "length"}
    # the separate behaviour pass (one batched pass of the policy over the padded completions)
    separate = completions_token_logprobs(policy, prompts, [c.token_ids for c in completions], gen.pad_id, 0.7)
    for c, expected in zip(completions, separate, strict=True):
        assert c.token_ids.size == c.logprobs.size == c.ref_logprobs.size > 0
        assert (c.finish_reason == "stop") == (c.token_ids[-1] == tokenizer.eos_token_id)
        assert (c.token_ids[:-1] != tokenizer.eos_token_id).all()
        np.testing.assert_allclose(c.logprobs, expected, rtol=0, atol=ATOL)
    for prompt, group in zip(prompts, groups, strict=True):
        for c in group:
            np.testing.assert_allclose(c.logprobs, alone(policy, prompt, c.token_ids, 0.7), rtol=0, atol=ATOL)
            np.testing.assert_allclose(c.ref_logprobs, alone(reference, prompt, c.token_ids, 0.7), rtol=0, atol=ATOL)


def randomise_adapters(model, seed: int) -> None:
    """As trained adapters would be: LoRA's B starts at zero, which would leave the model its base."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return saved_tiny_llama(tmp_path_factory.mktemp("model"))


def test_with_lora_the_reference_is_the_policy_with_its_adapters_off(model_dir):
    cfg = make_config("127.0.0.1:1", trainer={"lora_r": 4, "lora_alpha": 8},
                      searcher={"model": model_dir, "max_new_tokens": 12, "temperature": 0.7})  # fmt: skip
    gen = build_generator(cfg, seed=0)
    assert isinstance(gen.reference, AdaptersDisabled) and gen.reference.model is gen.model  # one copy
    randomise_adapters(gen.model, seed=1)
    separate, _ = load_model(model_dir)  # the reference as a separate copy would be
    prompt = gen.prompt_ids([{"role": "user", "content": "What is 3 + 4?"}])
    torch.manual_seed(0)
    (group,) = gen.sample([prompt], n=4)
    for c in group:
        np.testing.assert_allclose(c.ref_logprobs, alone(separate, prompt, c.token_ids, 0.7), rtol=0, atol=ATOL)
        # the adapters are back on once the reference has run: behaviour is the adapted policy's
        adapted = alone(gen.model, prompt, c.token_ids, 0.7)
        np.testing.assert_allclose(c.logprobs, adapted, rtol=0, atol=ATOL)
        assert np.abs(adapted - c.ref_logprobs).max() > 1e-2  # the adapters do change the policy


def test_with_full_fine_tuning_the_reference_is_a_separate_frozen_copy(model_dir):
    cfg = make_config("127.0.0.1:1", searcher={"model": model_dir})
    gen = build_generator(cfg, seed=0)
    assert isinstance(gen.reference, torch.nn.Module) and gen.reference is not gen.model
    with torch.no_grad():  # a trained policy: the reference stays as loaded
        for p in gen.model.parameters():
            p.add_(0.1)
    separate, _ = load_model(model_dir)
    for mine, theirs in zip(gen.reference.parameters(), separate.parameters(), strict=True):
        assert torch.equal(mine, theirs)
