"""vLLM generation backend (GPU): vLLM samples the tokens, Hugging Face copies score them.

vLLM renormalises its distribution under top-p and its own log-probs are not guaranteed to be at
the sampling temperature, so, as the paper's code does, behaviour and reference log-probs are
recomputed with Hugging Face models on the same GPU (the path shared with HFGenerator). Sampling
uses top_p = 1 and no top-k. A published version is loaded both into the Hugging Face copy and, in
place, into vLLM's model through a worker extension (`collective_rpc`), between batches.
"""

from __future__ import annotations

import torch

from policy.generation import HFGenerator


class WorkerWeights:
    """Mixed into vLLM's GPU worker (worker_extension_cls): load named tensors into the running model."""

    def load_published(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        device = next(self.model_runner.model.parameters()).device
        loaded = self.model_runner.model.load_weights(weights=((n, t.to(device)) for n, t in named_tensors))
        return len(loaded or ())


class VLLMGenerator(HFGenerator):
    def __init__(self, model_path: str, model, tokenizer, reference, temperature: float, max_new_tokens: int, **llm):
        from vllm import LLM

        super().__init__(model, tokenizer, reference, temperature, max_new_tokens)
        self.llm = LLM(model=model_path, worker_extension_cls=f"{__name__}.WorkerWeights", **llm)

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        super().load_weights(state_dict)
        self.llm.collective_rpc("load_published", args=(list(state_dict.items()),))

    def _sequences(
        self, input_ids: torch.Tensor, attention: torch.Tensor, common: int, n: int, sample: bool
    ) -> torch.Tensor:
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=self.temperature if sample else 0.0, top_p=1.0, top_k=-1, max_tokens=self.max_new_tokens
        )
        input_ids, attention = input_ids.repeat_interleave(n, dim=0), attention.repeat_interleave(n, dim=0)
        # vLLM's prefix cache shares each prompt's keys and values among its n samples
        prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention, strict=True)]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        completions = []
        for out in outputs:
            ids = list(out.outputs[0].token_ids)
            if out.outputs[0].finish_reason == "stop" and (not ids or ids[-1] != self.eos_id):
                ids.append(self.eos_id)  # ended by EOS: keep it, as the HF path does
            completions.append(ids)
        length = max(len(c) for c in completions)
        tail = torch.tensor([c + [self.pad_id] * (length - len(c)) for c in completions], dtype=input_ids.dtype)
        return torch.cat([input_ids, tail], dim=1)
