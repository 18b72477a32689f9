"""The policy a producer generates with, as the job configures it (searcher.*): the model, carrying the
trainer's LoRA adapters when it trains some, on the Hugging Face or the vLLM backend, with the frozen
reference for producers that record reference log-probs (with LoRA, the same weights with the adapters
off); and the subscription to the versions the trainer publishes. Searchers and the gateway both build
theirs here, so either backend serves both.
"""

from __future__ import annotations

import torch

from ops.config import TbaConfig
from ops.errors import ConfigError
from policy.generation import HFGenerator
from producers.weight_subscriber import WeightSubscriber


def build_generator(cfg: TbaConfig, seed: int, with_reference: bool = True) -> HFGenerator:
    """The configured backend on the model from disk; the reference too unless with_reference is False (the
    gateway records no reference log-probs: the filter computes them)."""
    from policy.models import frozen_reference, load_model

    s = cfg.searcher
    if s.backend == "vllm" and s.gguf_file:
        raise ConfigError("searcher.gguf_file: the vllm backend loads a model folder (convert the GGUF file once)")
    torch.manual_seed(seed)
    model, tokenizer = load_model(s.model, s.gguf_file, s.dtype)
    if cfg.trainer.lora_r:  # the trainer publishes adapters only: carry the same ones
        from policy.models import apply_lora

        model = apply_lora(model, cfg.trainer)
    if torch.cuda.is_available():
        model = model.cuda()
    reference = None
    if with_reference:  # with LoRA, the model itself with its adapters off
        gguf_file = s.gguf_file if not s.reference_model else None
        reference = frozen_reference(model, s.reference_model or s.model, gguf_file, s.dtype, s.model)
    if s.backend == "hf":
        return HFGenerator(model, tokenizer, reference, s.temperature, s.max_new_tokens)
    from policy.default_model import default_model_dir
    from policy.vllm_backend import VLLMGenerator

    cuda = torch.cuda.is_available()
    engine = {"dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "seed": seed,
              "max_model_len": s.max_model_len, "enforce_eager": not cuda}  # fmt: skip
    if s.kv_cache_mb or not cuda:  # on a CPU, gpu_memory_utilization would be a share of all RAM
        engine["kv_cache_memory_bytes"] = (s.kv_cache_mb or 1024) << 20
    else:
        engine["gpu_memory_utilization"] = s.gpu_memory_utilization
    path = s.model or str(default_model_dir())
    return VLLMGenerator(path, model, tokenizer, reference, s.temperature, s.max_new_tokens, **engine)


def weight_subscriber(cfg: TbaConfig, subscriber_id: str) -> WeightSubscriber:
    """A started subscription to the trainer's weight-sync service (searcher.weights_target, else weights.host:port)."""
    target = cfg.searcher.weights_target or f"{cfg.weights.host}:{cfg.weights.port}"
    return WeightSubscriber(cfg.weights, target, subscriber_id).start()


def swap_in_newest(subscriber: WeightSubscriber | None, generator: HFGenerator) -> int | None:
    """Load the newest received version into generator, if one arrived since the last call: its number, else None.
    Call it between generation batches only."""
    version = subscriber.take() if subscriber is not None else None  # only ever one newer than the last taken
    if version is None:
        return None
    generator.load_weights(version.state_dict())
    return version.version
