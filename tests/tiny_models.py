"""Tiny randomly initialised models and a character tokenizer with a chat template: nothing downloads."""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<eos>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(string.printable))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=SPECIALS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(
    seed: int = 0, vocab_size: int = 128, dtype=torch.float32, head_dim: int = 8, context: int = 512
) -> LlamaForCausalLM:
    """head_dim 64 for vLLM, whose attention kernels take only the usual head sizes."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=4 * head_dim, intermediate_size=8 * head_dim, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context, tie_word_embeddings=True,
        eos_token_id=1, pad_token_id=0, bos_token_id=None,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(dtype).eval()


def saved_tiny_llama(path, seed: int = 0, **shape) -> str:
    """A tiny causal LM with the char tokenizer saved as a model folder (the way searchers load models)."""
    tiny_llama(seed, **shape).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


def tiny_classifier(path, num_labels: int, seed: int = 0) -> str:
    """A tiny sequence-classification model with the char tokenizer, saved to path (returned as str)."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=num_labels, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)
