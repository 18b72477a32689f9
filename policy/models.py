"""The policy's model: loading it from a local folder (nothing from a hub), LoRA adapters as the trainer
and the searchers both carry them, a chat as the policy is prompted with it, and swapping published
weights into a running model.
"""

from __future__ import annotations

import torch

from ops.errors import ConfigError, TbaError


def load_model(path: str, gguf_file: str | None = None, dtype: str = "float32", field: str = "searcher.model"):
    """(model, tokenizer) from a local folder (or a GGUF file in it); "" is the default model.

    Nothing is downloaded from a model hub; field is the setting named when the folder cannot be loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if dtype == "auto":  # bf16 where the device supports it
        dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    if not path:
        from policy.default_model import default_model_dir

        path, gguf_file = str(default_model_dir()), None

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **extra)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=getattr(torch, dtype), **extra)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{field}: cannot load a model from {path!r}: {exc}") from exc
    # the folder's sampling defaults (repetition penalty, top-k, ...) would change the distribution sampled
    # from: only the temperature does, so the behaviour log-probs are the tempered policy's
    g = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=g.bos_token_id, eos_token_id=g.eos_token_id, pad_token_id=g.pad_token_id
    )
    return model.eval(), tokenizer


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    """A chat as the policy is prompted with it: the model's chat template, ready for the assistant's turn."""
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def apply_lora(model, t):
    """Wrap model with LoRA adapters per trainer config t (searchers do the same, so names match)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=0.0, target_modules=list(t.lora_targets))
    return get_peft_model(model, config)


class AdaptersDisabled:
    """A LoRA-carrying model with its adapters off, called as a model: its base weights, i.e. the frozen
    reference, without a second copy of them. Adapters stay on for everyone else between calls."""

    def __init__(self, model):
        self.model = model  # a peft PeftModel
        self.config = model.config

    def __call__(self, *args, **kwargs):
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)

    def parameters(self):
        return self.model.parameters()


def frozen_reference(model, path: str, gguf_file: str | None, dtype: str, policy_path: str):
    """The reference for reference log-probs. With LoRA on the reference's own weights (path is the policy's
    policy_path), model itself with its adapters off: one copy of the weights. Else a separate frozen copy
    from path, on model's device (full fine-tuning changes model's own weights; or another reference)."""
    from peft import PeftModel

    if isinstance(model, PeftModel) and path == policy_path:
        return AdaptersDisabled(model)
    reference, _ = load_model(path, gguf_file, dtype)
    return reference.to(next(model.parameters()).device)


def load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a published state dict into model's own tensors, in place (the HF generation backend's swap).

    Missing names are allowed only for tensors tied to one that is present (e.g. lm_head to embeddings)
    or when only part of the model is published (LoRA adapters); unknown names are an error.
    """
    own = model.state_dict()
    unknown = sorted(set(state_dict) - set(own))
    if unknown:
        raise TbaError(f"published weights name tensors this model lacks: {unknown[:5]}")
    with torch.no_grad():
        for name, tensor in state_dict.items():
            own[name].copy_(tensor)


def merged_weights(model) -> dict[str, torch.Tensor]:
    """The model's full weights under the base model's names, LoRA adapters folded in (W + scale * B @ A).

    What an engine that knows nothing of adapters (vLLM) loads; computed aside, so the adapters and
    the base weights themselves stay as they are (merging in place and back would drift them).
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        return {name: t.detach() for name, t in model.state_dict().items()}
    base = model.get_base_model()
    weights = {name: t.detach() for name, t in base.state_dict().items() if ".lora_" not in name}
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                key = f"{name}.base_layer.weight"
                for adapter in module.active_adapters:
                    weights[key] = weights[key] + module.get_delta_weight(adapter).to(weights[key].dtype)
    return {name.replace(".base_layer.", "."): t for name, t in weights.items()}
