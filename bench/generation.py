"""Generation backends side by side: Hugging Face vs vLLM on the embedded model, the searcher's real batch.

    python bench/generation.py [--rounds 3]  ->  bench/results/generation.json

Both backends share one Hugging Face model and reference (vLLM adds its engine, from the same
folder) and take turns on the same prompts: searcher.prompts_per_batch training prompts of the
default task, searcher.samples_per_prompt samples each, up to searcher.max_new_tokens tokens, at
the sampling temperature. A round is one `sample()` call of each: what a searcher does per batch,
behaviour and reference log-probs included (`*_tokens_s`, `ratio`); each round also times sampling
alone (`*_generate_tokens_s`, `generate_ratio`). tokens/s counts completion tokens. The log-prob gap is
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


def timed(generator, prompts, n) -> dict:
    """One batch both ways: sampling alone (generate) and what a searcher gets (sample: log-probs too)."""
    start = time.perf_counter()
    _, _, _, lengths, _ = generator.generate(prompts, n, sample=True)
    generated = time.perf_counter() - start
    start = time.perf_counter()
    groups = generator.sample(prompts, n)
    sampled = time.perf_counter() - start
    tokens = sum(c.token_ids.size for g in groups for c in g)
    return {"generate": (generated, int(lengths.sum())), "sample": (sampled, tokens), "groups": groups}


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
    timed(hf, prompts, s.samples_per_prompt)  # warm-up, not counted
    timed(vllm, prompts, s.samples_per_prompt)
    totals = {(name, part): [0.0, 0] for name in ("hf", "vllm") for part in ("generate", "sample")}
    gap = 0.0
    for _ in range(args.rounds):  # taking turns: whatever else the machine does falls on both
        for name, generator in (("hf", hf), ("vllm", vllm)):
            batch = timed(generator, prompts, s.samples_per_prompt)
            for part in ("generate", "sample"):
                totals[name, part][0] += batch[part][0]
                totals[name, part][1] += batch[part][1]
            if generator is vllm:  # the engine's log-probs of its last batch (sample's) against Hugging Face's
                completions = [c for g in batch["groups"] for c in g]
                for c, engine in zip(completions, vllm.engine_logprobs, strict=True):
                    k = min(len(engine), c.logprobs.size)
                    gap = max(gap, float(np.abs(engine[:k] - c.logprobs[:k]).max(initial=0.0)))
    vllm.close()
    rate = {key: tokens / seconds for key, (seconds, tokens) in totals.items()}
    hf_tokens_s, vllm_tokens_s = rate["hf", "sample"], rate["vllm", "sample"]
    write_results(args.out, {
        "model": "SmolLM2-135M-Instruct (float32)",
        "batch": {"prompts": len(prompts), "samples_per_prompt": s.samples_per_prompt,
                  "max_new_tokens": s.max_new_tokens, "temperature": s.temperature},
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "hf_tokens_s": round(hf_tokens_s, 1),
        "vllm_tokens_s": round(vllm_tokens_s, 1),
        "ratio": round(vllm_tokens_s / hf_tokens_s, 3),
        "hf_generate_tokens_s": round(rate["hf", "generate"], 1),  # sampling alone, no log-probs
        "vllm_generate_tokens_s": round(rate["vllm", "generate"], 1),
        "generate_ratio": round(rate["vllm", "generate"] / rate["hf", "generate"], 3),
        "logprob_max_abs_diff": gap,
        "vllm_engine_load_s": round(engine_load_s, 1),
    })  # fmt: skip


if __name__ == "__main__":  # vLLM starts its engine in a process of its own: this module is imported there
    main()
