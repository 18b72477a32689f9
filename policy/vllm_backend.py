"""vLLM generation backend (GPU or CPU): vLLM samples the tokens, Hugging Face copies score them.

Behaviour and reference log-probs are recomputed with the Hugging Face models (the path shared
with HFGenerator), as the paper's code does: one code path for the quantity the TB loss uses. The
engine's own log-probs after temperature are kept per batch (`engine_logprobs`) so tests and
bench/generation.py can hold the two against each other. Sampling uses top_p = 1 and no top-k.

A published version reaches the running engine without pickling tensors through its RPC: the
full weights (LoRA adapters merged in) are written once to a safetensors file in shared memory,
the engine's workers reload from that path with vLLM's in-place reload (which redoes whatever the
engine did to the weights when it loaded them, such as the CPU backend's repacking), and the file
is removed.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ops.shared_memory import directory
from policy.generation import HFGenerator
from policy.models import merged_weights
from schemas.weights import unaliased


class WorkerWeights:
    """Mixed into vLLM's worker (worker_extension_cls): reload the model from a published weights file."""

    def load_published(self, path: str) -> int:
        from safetensors.torch import load_file

        tensors = load_file(path)  # memory-mapped from shared memory
        self.reload_weights(weights_iterator=iter(tensors.items()))
        return len(tensors)


class VLLMGenerator(HFGenerator):
    def __init__(self, model_path: str, model, tokenizer, reference, temperature: float, max_new_tokens: int, **engine):
        from vllm import LLM

        super().__init__(model, tokenizer, reference, temperature, max_new_tokens)
        # prompts go in as token ids and completions come out as ids: our tokenizer does the text
        self.llm = LLM(model=model_path, skip_tokenizer_init=True, logprobs_mode="processed_logprobs",
                       worker_extension_cls=f"{__name__}.WorkerWeights", **engine)  # fmt: skip
        self.engine_logprobs: list[np.ndarray] = []  # the last batch's, per completion, as the engine saw them

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        super().load_weights(state_dict)
        from safetensors.torch import save_file

        # a tied tensor (lm_head to the embeddings) once: the engine ties it again
        weights = {name: t.contiguous().cpu() for name, t in unaliased(merged_weights(self.model))}

        path = directory() / f"tba-vllm-weights-{os.getpid()}.safetensors"
        try:
            save_file(weights, path)
            self.llm.collective_rpc("load_published", args=(str(path),))
        finally:
            path.unlink(missing_ok=True)
        self.llm.reset_prefix_cache()  # cached prompt keys and values were computed with the old weights

    def close(self) -> None:
        """Stop the engine's processes now, not at interpreter exit."""
        self.llm.llm_engine.engine_core.shutdown()

    def _sequences(
        self, input_ids: torch.Tensor, attention: torch.Tensor, common: int, n: int, sample: bool
    ) -> torch.Tensor:
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=self.temperature if sample else 0.0, top_p=1.0, top_k=-1, max_tokens=self.max_new_tokens,
            stop_token_ids=[self.eos_id], logprobs=0, detokenize=False,
        )  # fmt: skip
        input_ids, attention = input_ids.repeat_interleave(n, dim=0), attention.repeat_interleave(n, dim=0)
        # vLLM's prefix cache shares each prompt's keys and values among its n samples
        prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention, strict=True)]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        completions, self.engine_logprobs = [], []
        for out in outputs:
            sampled = out.outputs[0]
            ids = list(sampled.token_ids)
            steps = sampled.logprobs or []
            self.engine_logprobs.append(np.array([s[t].logprob for s, t in zip(steps, ids, strict=False)]))
            if sampled.finish_reason == "stop" and (not ids or ids[-1] != self.eos_id):
                ids.append(self.eos_id)  # ended by EOS: keep it, as the HF path does
            completions.append(ids)
        length = max(len(c) for c in completions)
        tail = torch.tensor([c + [self.pad_id] * (length - len(c)) for c in completions], dtype=input_ids.dtype)
        return torch.cat([input_ids, tail], dim=1)
