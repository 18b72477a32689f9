"""What a searcher's batch costs, Hugging Face vs vLLM on the embedded model: against generation alone and
against the three-pass path it replaced.

    python bench/generation.py [--rounds 5]  ->  bench/results/generation.json

Both backends share one Hugging Face model and reference (vLLM adds its engine, from the same folder) and
take turns on the same prompts: searcher.prompts_per_batch training prompts of the default task,
searcher.samples_per_prompt samples each, up to searcher.max_new_tokens tokens, at the sampling temperature.
Per round and backend, in turns so that whatever else the machine does falls on every path alike:
- `generate`: sampling alone, no log-probs;
- `sample`: a searcher's batch now: behaviour log-probs from the generation pass, one reference pass;
- `three_pass`: the batch as it was: `sample` plus a separate behaviour log-prob pass of the policy.
tokens/s counts completion tokens; each figure is the median over the rounds. The machine's load average
before and after is recorded, so a busy machine shows in the JSON. The log-prob gap is the largest
per-token difference between vLLM's own log-probs (after temperature) and a Hugging Face pass over the
same tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import write_results  # noqa: E402
from ops.config import load_config  # noqa: E402


def timed(generator, model, prompts, n, temperature) -> dict:
    """One batch each way: {path: tokens/s}, and the sampled groups with the policy's own pass over them."""
    from policy.logprobs import completions_token_logprobs

    start = time.perf_counter()
    _, _, lengths, _ = generator.generate(prompts, n, sample=True)
    rates = {"generate": int(lengths.sum()) / (time.perf_counter() - start)}
    start = time.perf_counter()
    groups = generator.sample(prompts, n)
    sampled = time.perf_counter() - start
    tokens = sum(c.token_ids.size for g in groups for c in g)
    start = time.perf_counter()  # the behaviour pass the generation pass now replaces
    with torch.no_grad():
        policy_pass = completions_token_logprobs(
            model, prompts, [c.token_ids for g in groups for c in g], generator.pad_id, temperature
        )
    rates["sample"] = tokens / sampled
    rates["three_pass"] = tokens / (sampled + time.perf_counter() - start)
    return {"rates": rates, "groups": groups, "policy_pass": policy_pass}


def ratio(median: dict, a: str, b: str) -> float:
    return round(median[f"{a}_tokens_s"] / median[f"{b}_tokens_s"], 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench/results/generation.json"))
    args = parser.parse_args()

    from policy.default_model import default_model_dir
    from policy.generation import HFGenerator
    from policy.models import load_model
    from policy.tasks import build_task
    from policy.vllm_backend import VLLMGenerator

    load_before = os.getloadavg()
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
    backends = {"hf": hf, "vllm": vllm}
    for generator in backends.values():  # warm-up, not counted
        timed(generator, model, prompts, s.samples_per_prompt, s.temperature)
    rates = {(name, path): [] for name in backends for path in ("generate", "sample", "three_pass")}
    gap = 0.0
    for _ in range(args.rounds):
        for name, generator in backends.items():
            batch = timed(generator, model, prompts, s.samples_per_prompt, s.temperature)
            for path, rate in batch["rates"].items():
                rates[name, path].append(rate)
            if name == "vllm":  # the engine's log-probs against a Hugging Face pass over the same tokens
                completions = [c for g in batch["groups"] for c in g]
                for c, hf_pass in zip(completions, batch["policy_pass"], strict=True):
                    gap = max(gap, float(np.abs(c.logprobs - hf_pass).max(initial=0.0)))
    vllm.close()
    median = {f"{name}_{path}_tokens_s": round(statistics.median(r), 1) for (name, path), r in rates.items()}
    write_results(args.out, {
        "model": "SmolLM2-135M-Instruct (float32)",
        "batch": {"prompts": len(prompts), "samples_per_prompt": s.samples_per_prompt,
                  "max_new_tokens": s.max_new_tokens, "temperature": s.temperature},
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        **median,
        "sample_vs_three_pass": {name: ratio(median, f"{name}_sample", f"{name}_three_pass") for name in backends},
        "sample_vs_generate": {name: ratio(median, f"{name}_sample", f"{name}_generate") for name in backends},
        "vllm_vs_hf_sample": ratio(median, "vllm_sample", "hf_sample"),
        "logprob_max_abs_diff": gap,
        "vllm_engine_load_s": round(engine_load_s, 1),
    })  # fmt: skip


if __name__ == "__main__":  # vLLM starts its engine in a process of its own: this module is imported there
    main()
