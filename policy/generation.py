"""Generation backends: sample completions with per-token behaviour and reference log-probs.

HFGenerator runs Hugging Face transformers (CPU or GPU). Behaviour log-probs come from the generation
pass itself: each step's logits over the temperature of the call, as generate() samples from them
(top_p = 1, no top-k: the behaviour distribution is the tempered policy itself), so no second pass
of the policy runs. Searchers' samples (`sample`) also carry the reference's log-probs at the
sampling temperature, from one forward pass of the reference; the gateway's (`complete`) carry none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from policy.logprobs import completions_token_logprobs
from policy.models import chat_prompt_ids, load_into


@dataclass
class Completion:
    text: str
    token_ids: np.ndarray  # (T,) int32, up to and including EOS
    logprobs: np.ndarray  # (T,) float32, behaviour policy at the sampling temperature
    ref_logprobs: np.ndarray  # (T,) float32; empty from complete(), which runs no reference
    finish_reason: str  # "stop" (EOS) or "length"
    top_ids: np.ndarray | None = None  # (T, k) int64: complete(top_logprobs=k)'s most likely tokens at each step
    top_logprobs: np.ndarray | None = None  # (T, k) float32: their log-probs, as `logprobs` is taken


class SampledTokenLogprobs(LogitsProcessor):
    """Records the log-prob of each token generate() picks, from the logits it picks it with, at a temperature.

    A processor passed to generate() runs before its sampling warpers (temperature, top-k, top-p) and
    changes nothing here: it takes log_softmax(logits / temperature), token_logprobs' arithmetic on the
    logits generate() then divides by the same temperature and samples from. A step's token is known
    at the next call (the last column of input_ids); the last step's from the finished sequences.
    """

    def __init__(self, temperature: float, top: int = 0):
        self.temperature = temperature
        self.top = top  # also keep this many most likely tokens per step
        self.step_logp: torch.Tensor | None = None  # (N, V): the latest step's, until its token is known
        self.chosen: list[torch.Tensor] = []  # per step (N,)
        self.top_values: list[torch.Tensor] = []  # per step (N, top)
        self.top_ids: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1])
        self.step_logp = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        if self.top:
            values, ids = self.step_logp.topk(self.top, dim=-1)
            self.top_values.append(values)
            self.top_ids.append(ids)
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        if self.step_logp is not None:  # the first call comes before any token is picked
            self.chosen.append(self.step_logp.gather(-1, tokens[:, None]).squeeze(-1))
        self.step_logp = None

    def logprobs(self, completion: torch.Tensor) -> np.ndarray:
        """(N, T) float32 for the generated tokens completion (N, T); steps after EOS hold padding's."""
        self._take(completion[:, -1])
        return torch.stack(self.chosen, dim=1).cpu().numpy().astype(np.float32)

    def tops(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N, T, top) int64, log-probs (N, T, top) float32), best first."""
        return torch.stack(self.top_ids, 1).cpu().numpy(), torch.stack(self.top_values, 1).cpu().numpy()


def sampling(temperature: float) -> dict:
    """generate()'s arguments to sample the policy at the temperature (0: greedy), and nothing else."""
    return (
        {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
        if temperature > 0
        else {"do_sample": False}
    )


class HFGenerator:
    def __init__(self, model, tokenizer, reference, temperature: float, max_new_tokens: int):
        self.model = model
        self.tokenizer = tokenizer
        self.reference = reference
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Swap in a published version (between batches)."""
        load_into(self.model, state_dict)

    def close(self) -> None:
        """Nothing to release: the models are plain objects of this process."""

    def _generate(self, prompts: torch.Tensor, attention: torch.Tensor, common: int, n: int, max_new_tokens: int,
                  **sampling):  # fmt: skip
        """generate()'s output (a dict) for each padded prompt n times: sequences (P*n, W + T), padded after EOS.

        The first `common` tokens are the same in every prompt (the system prompt, the few-shot
        example): their keys and values are computed once for the batch, each prompt's rest once for
        its n samples, and generate() then only decodes.
        """
        prompts, attention = prompts.to(self.device), attention.to(self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        cache = None
        if common > 0:
            cache = self.model(input_ids=prompts[:1, :common], use_cache=True, logits_to_keep=1).past_key_values
            cache.batch_repeat_interleave(prompts.shape[0])
        if prompts.shape[1] - 1 > common:  # the rest, but the last token, which generate() feeds itself
            rest = slice(common, prompts.shape[1] - 1)
            cache = self.model(
                input_ids=prompts[:, rest], attention_mask=attention[:, : rest.stop], position_ids=positions[:, rest],
                past_key_values=cache, use_cache=True, logits_to_keep=1,
            ).past_key_values  # fmt: skip
        if cache is not None:
            cache.batch_repeat_interleave(n)
        return self.model.generate(
            input_ids=prompts.repeat_interleave(n, dim=0),
            attention_mask=attention.repeat_interleave(n, dim=0),
            past_key_values=cache,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            return_dict_in_generate=True,
            **sampling,
        )

    def _sequences(
        self, prompts: torch.Tensor, attention: torch.Tensor, common: int, n: int, sample: bool
    ) -> torch.Tensor:
        """(P*n, W + T): each padded prompt n times, followed by its completions, padded after EOS."""
        temperature = self.temperature if sample else 0.0
        return self._generate(
            prompts, attention, common, n, self.max_new_tokens, **sampling(temperature)
        ).sequences.cpu()

    def _padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(input_ids (P, W), attention (P, W), W, common): prompts padded to W after the prefix they all share
        (at least one token stays after it), so that prefix is one block of the batch."""
        common = 0
        for column in zip(*prompts, strict=False):
            if any(t != column[0] for t in column):
                break
            common += 1
        common = min(common, min(len(p) for p in prompts) - 1)
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([p[:common] + [self.pad_id] * (width - len(p)) + p[common:] for p in prompts])
        attention = torch.tensor([[1] * common + [0] * (width - len(p)) + [1] * (len(p) - common) for p in prompts])
        return input_ids, attention, width, common

    def _ends(self, completion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lengths, ended) of completions (N, T): each through its first EOS, if it has one."""
        is_eos = completion == self.eos_id
        ended = is_eos.any(-1)
        return torch.where(ended, is_eos.int().argmax(-1) + 1, completion.shape[1]), ended

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, sample: bool):
        """n completions of each prompt, no log-probs: (sequences (P*n, W + T), W, lengths, ended); rows
        i*n .. i*n+n-1 belong to prompt i. Attention masks and positions skip the padding."""
        input_ids, attention, width, common = self._padded(prompts)
        out = self._sequences(input_ids, attention, common, n, sample)  # (P*n, W + T)
        return out, width, *self._ends(out[:, width:])

    @torch.no_grad()
    def complete(
        self, prompts: list[list[int]], n: int, temperature: float, max_new_tokens: int, top_logprobs: int = 0
    ) -> list[list[Completion]]:
        """n completions of each prompt with the behaviour log-probs of the generation pass itself.

        temperature > 0 samples the tempered policy (top-p 1, no top-k), and each sampled token's
        log-prob is its log-softmax of the logits over that temperature, recorded as generate() runs.
        temperature 0 is greedy decoding, where no temperature divides the logits: the log-probs are then
        those of the untempered softmax (as vLLM reports them). top_logprobs > 0 also keeps that many
        most likely tokens per step. No reference model runs: ref_logprobs are empty.
        """
        input_ids, attention, width, common = self._padded(prompts)
        recorder = SampledTokenLogprobs(temperature or 1.0, top_logprobs)
        out = self._generate(input_ids, attention, common, n, max_new_tokens,
                             logits_processor=LogitsProcessorList([recorder]), **sampling(temperature))  # fmt: skip
        completion = out.sequences[:, width:]  # (N, T)
        logprobs = recorder.logprobs(completion)  # (N, T)
        completion = completion.cpu()
        lengths, ended = self._ends(completion)
        return self._completions(completion, lengths, ended, n, logprobs, recorder.tops() if top_logprobs else None)

    def _completions(self, completion, lengths, ended, n: int, logprobs, tops) -> list[list[Completion]]:
        """Rows (N, T) cut at their lengths (tokens after EOS dropped) into Completions, n to a prompt."""
        results = []
        for i in range(completion.shape[0]):
            t = int(lengths[i])
            ids = completion[i, :t]
            results.append(
                Completion(
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    token_ids=ids.numpy().astype(np.int32),
                    logprobs=np.asarray(logprobs[i, :t], np.float32),
                    ref_logprobs=np.zeros(0, np.float32),
                    finish_reason="stop" if bool(ended[i]) else "length",
                    top_ids=tops[0][i, :t] if tops else None,
                    top_logprobs=tops[1][i, :t] if tops else None,
                )
            )
        return [results[j * n : (j + 1) * n] for j in range(len(results) // n)]

    def texts(self, prompts: list[list[int]], sample: bool) -> tuple[list[str], list[bool]]:
        """One completion per prompt, greedy or sampled: (texts, whether each ended with EOS)."""
        out, width, lengths, ended = self.generate(prompts, 1, sample)
        texts = [
            self.tokenizer.decode(out[i, width : width + int(n)], skip_special_tokens=True)
            for i, n in enumerate(lengths)
        ]
        return texts, ended.tolist()

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], n: int) -> list[list[Completion]]:
        """n completions for each prompt (token ids), sampled at the temperature: the behaviour log-probs of
        the generation pass (complete()'s), the reference's from one pass of it over all completions."""
        groups = self.complete(prompts, n, self.temperature, self.max_new_tokens)
        completions = [c for group in groups for c in group]
        refs = completions_token_logprobs(
            self.reference, prompts, [c.token_ids for c in completions], self.pad_id, self.temperature
        )
        for c, ref in zip(completions, refs, strict=True):
            c.ref_logprobs = ref
        return groups
