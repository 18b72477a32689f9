"""vLLM generation backend (GPU or CPU): vLLM samples the tokens and reports their log-probs.

Behaviour log-probs are the engine's own for the tokens it sampled, after temperature (its
processed log-probs; sampling uses top_p = 1 and no top-k), as HFGenerator's are generate()'s: for
searchers (`sample`) and the gateway (`complete`) alike. Searchers' reference log-probs come from the
Hugging Face reference (with LoRA, the Hugging Face copy of the policy with its adapters off), by
the path HFGenerator shares with the filter.

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
from policy.generation import Completion, HFGenerator
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

    def complete(
        self, prompts: list[list[int]], n: int, temperature: float, max_new_tokens: int, top_logprobs: int = 0
    ) -> list[list[Completion]]:
        """HFGenerator.complete on the engine (and so sample() too): its sampled tokens' processed log-probs
        (after temperature; untempered when greedy, where vLLM divides by no temperature) are the
        behaviour log-probs."""
        copies = n if temperature == 0 else 1  # greedy, vLLM takes n = 1 only: each copy of a prompt gets one
        params = self._params(temperature, max_new_tokens, n=n // copies, logprobs=top_logprobs)
        rows = [{"prompt_token_ids": p} for p in prompts for _ in range(copies)]
        outputs = self.llm.generate(rows, params, use_tqdm=False)
        completions = [self._engine_completion(c, top_logprobs) for out in outputs for c in out.outputs]
        return [completions[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _params(self, temperature: float, max_tokens: int, n: int = 1, logprobs: int | None = None):
        """The tempered policy as HFGenerator samples it (top-p 1, no top-k), up to EOS, token ids only."""
        from vllm import SamplingParams

        return SamplingParams(n=n, temperature=temperature, top_p=1.0, top_k=-1, max_tokens=max_tokens,
                              stop_token_ids=[self.eos_id], logprobs=logprobs, detokenize=False)  # fmt: skip

    def _engine_completion(self, sampled, top_logprobs: int) -> Completion:
        """One of the engine's completions: token ids through EOS (the engine keeps the stop token), per step
        the sampled token's log-prob and the top_logprobs best (by the engine's rank)."""
        ids = list(sampled.token_ids)
        steps = sampled.logprobs or []
        tops = None
        if top_logprobs:  # a step holds the top_logprobs best and the sampled token, each with its rank
            best = [sorted((lp.rank, token, lp.logprob) for token, lp in step.items())[:top_logprobs] for step in steps]
            tops = (
                np.array([[token for _, token, _ in b] for b in best], np.int64).reshape(len(ids), top_logprobs),
                np.array([[lp for _, _, lp in b] for b in best], np.float32).reshape(len(ids), top_logprobs),
            )
        return Completion(
            text=self.tokenizer.decode(ids, skip_special_tokens=True),
            token_ids=np.array(ids, np.int32),
            logprobs=np.array([step[t].logprob for step, t in zip(steps, ids, strict=True)], np.float32),
            ref_logprobs=np.zeros(0, np.float32),
            finish_reason="stop" if ids and ids[-1] == self.eos_id else "length",
            top_ids=tops[0] if tops else None,
            top_logprobs=tops[1] if tops else None,
        )

    def _sequences(
        self, input_ids: torch.Tensor, attention: torch.Tensor, common: int, n: int, sample: bool
    ) -> torch.Tensor:
        params = self._params(self.temperature if sample else 0.0, self.max_new_tokens)
        input_ids, attention = input_ids.repeat_interleave(n, dim=0), attention.repeat_interleave(n, dim=0)
        # vLLM's prefix cache shares each prompt's keys and values among its n samples
        prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention, strict=True)]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        completions = []
        for out in outputs:
            sampled = out.outputs[0]
            ids = list(sampled.token_ids)
            if sampled.finish_reason == "stop" and (not ids or ids[-1] != self.eos_id):
                ids.append(self.eos_id)  # ended by EOS: keep it, as the HF path does
            completions.append(ids)
        length = max(len(c) for c in completions)
        tail = torch.tensor([c + [self.pad_id] * (length - len(c)) for c in completions], dtype=input_ids.dtype)
        return torch.cat([input_ids, tail], dim=1)
