"""The vLLM backend, where vLLM can run (a CUDA GPU and the .[vllm] extra); elsewhere these tests skip."""

import numpy as np
import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm]' on a GPU machine)")
if not torch.cuda.is_available():
    pytest.skip("vLLM needs a CUDA GPU", allow_module_level=True)

from policy.logprobs import token_logprobs  # noqa: E402
from policy.vllm_backend import VLLMGenerator  # noqa: E402
from tests.tiny_models import char_tokenizer, saved_tiny_llama, tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    saved_tiny_llama(path)
    cuda = torch.device("cuda")
    return VLLMGenerator(
        str(path), tiny_llama(0).to(cuda), char_tokenizer(), tiny_llama(0).to(cuda), 0.7, 8,
        gpu_memory_utilization=0.2, dtype="float32", enforce_eager=True,
    )  # fmt: skip


def test_vllm_samples_carry_hf_recomputed_logprobs(generator):
    prompt = generator.prompt_ids([{"role": "user", "content": "What is 2+2?"}])
    (group,) = generator.sample([prompt], n=4)
    for c in group:
        seq = torch.tensor([prompt + c.token_ids.tolist()], device="cuda")
        logits = generator.model(seq).logits[:, len(prompt) - 1 : -1]
        expected = token_logprobs(logits, seq[:, len(prompt) :], 0.7)[0].cpu().numpy()
        np.testing.assert_allclose(c.logprobs, expected, atol=1e-3)


def test_published_weights_reach_the_vllm_engine(generator):
    trained = tiny_llama(5)
    generator.load_weights({k: v.cuda() for k, v in trained.state_dict().items()})
    prompt = generator.prompt_ids([{"role": "user", "content": "Hi"}])
    (vllm_text,), _ = generator.texts([prompt], sample=False)
    ids = torch.tensor([prompt])
    expected = trained.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8)
    hf_text = generator.tokenizer.decode(expected[0, len(prompt) :], skip_special_tokens=True)
    assert vllm_text == hf_text
