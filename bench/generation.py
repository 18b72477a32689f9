"""Generation backends side by side: Hugging Face vs vLLM on the embedded model, the searcher's real batch.

    python bench/generation.py [--rounds 3]  ->  bench/results/generation.json

Both backends share one Hugging Face model and reference (vLLM adds its engine, from the same
folder) and take turns on the same prompts: searcher.prompts_per_batch training prompts of the
default task, searcher.samples_per_prompt samples each, up to searcher.max_new_tokens tokens, at
the sampling temperature. A round is one `sample()` call of each: what a searcher does per batch,
behaviour and reference log-probs included. tokens/s counts completion tokens. The log-prob gap is
the largest per-token difference between vLLM's own log-probs (after temperature) and the Hugging
Face log-probs of the same tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import write_results  # noqa: E402
from ops.config import load_config  # noqa: E402


def timed_sample(generator, prompts, n) -> tuple[float, int, list]:
    start = time.perf_counter()
    groups = generator.sample(prompts, n)
    seconds = time.perf_counter() - start
    return seconds, sum(c.token_ids.size for g in groups for c in g), groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench/results/generation.json"))
    args = parser.parse_args()

    from policy.default_model import default_model_dir
    from policy.generation import HFGenerator
    from policy.models import load_model
    from policy.tasks import build_task
    from policy.vllm_backend import VLLMGenerator

    cfg = load_config()
    s = cfg.searcher
    torch.manual_seed(0)
    model, tokenizer = load_model("", None, "float32")
    reference, _ = load_model("", None, "float32")
    task = build_task(cfg.task)
    hf = HFGenerator(model, tokenizer, reference, s.temperature, s.max_new_tokens)
    prompts = [hf.prompt_ids(p.messages) for p in task.train[: s.prompts_per_batch]]
    started = time.perf_counter()
    vllm = VLLMGenerator(str(default_model_dir()), model, tokenizer, reference, s.temperature, s.max_new_tokens,
                         dtype="float32", enforce_eager=True, kv_cache_memory_bytes=1 << 30, seed=0)  # fmt: skip
    engine_load_s = time.perf_counter() - started
    timed_sample(hf, prompts, s.samples_per_prompt)  # warm-up, not counted
    timed_sample(vllm, prompts, s.samples_per_prompt)
    totals = {"hf": [0.0, 0], "vllm": [0.0, 0]}
    gap = 0.0
    for _ in range(args.rounds):  # taking turns: whatever else the machine does falls on both
        for name, generator in (("hf", hf), ("vllm", vllm)):
            seconds, tokens, groups = timed_sample(generator, prompts, s.samples_per_prompt)
            totals[name][0] += seconds
            totals[name][1] += tokens
            if generator is vllm:
                completions = [c for g in groups for c in g]
                for c, engine in zip(completions, vllm.engine_logprobs, strict=True):
                    k = min(len(engine), c.logprobs.size)
                    gap = max(gap, float(np.abs(engine[:k] - c.logprobs[:k]).max(initial=0.0)))
    vllm.close()
    hf_tokens_s = totals["hf"][1] / totals["hf"][0]
    vllm_tokens_s = totals["vllm"][1] / totals["vllm"][0]
    write_results(args.out, {
        "model": "SmolLM2-135M-Instruct (float32)",
        "batch": {"prompts": len(prompts), "samples_per_prompt": s.samples_per_prompt,
                  "max_new_tokens": s.max_new_tokens, "temperature": s.temperature},
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "hf_tokens_s": round(hf_tokens_s, 1),
        "vllm_tokens_s": round(vllm_tokens_s, 1),
        "ratio": round(vllm_tokens_s / hf_tokens_s, 3),
        "logprob_max_abs_diff": gap,
        "vllm_engine_load_s": round(engine_load_s, 1),
    })  # fmt: skip


if __name__ == "__main__":  # vLLM starts its engine in a process of its own: this module is imported there
    main()
