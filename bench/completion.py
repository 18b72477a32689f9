"""Does completing text-only groups keep up with the searchers? A filter's completion rate beside a searcher's
generation rate, on the embedded model, in one process, taking turns.

    python bench/completion.py [--rounds 3]  ->  bench/results/completion.json

A round: one searcher batch (`HFGenerator.sample`: searcher.prompts_per_batch training prompts of the
default task x searcher.samples_per_prompt samples, log-probs included), then the same groups stripped
to text (prompt, completions, rewards) and completed as the filter does (`GroupCompleter`: chat
template, tokenizing, the reference's log-probs). `completer_groups_s / searcher_groups_s` is how
many searchers one filter's completing keeps up with on the same cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import write_results  # noqa: E402
from ops.config import load_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench/results/completion.json"))
    args = parser.parse_args()

    from policy.completion import GroupCompleter
    from policy.generation import HFGenerator
    from policy.models import load_model
    from policy.tasks import build_task
    from schemas.records import Sample, TrajectoryGroup

    cfg = load_config()
    s = cfg.searcher
    torch.manual_seed(0)
    model, tokenizer = load_model("", None, "float32")
    reference, _ = load_model("", None, "float32")
    searcher = HFGenerator(model, tokenizer, reference, s.temperature, s.max_new_tokens)
    completer = GroupCompleter(reference, tokenizer, cfg.trainer.temperature)
    problems = build_task(cfg.task).train[: s.prompts_per_batch]
    prompts = [searcher.prompt_ids(p.messages) for p in problems]

    def text_only(problem, completions) -> TrajectoryGroup:
        empty_i, empty_f = np.zeros(0, np.int32), np.zeros(0, np.float32)
        samples = [Sample(c.text, empty_i, empty_f, empty_f, 0.0, c.finish_reason) for c in completions]
        return TrajectoryGroup(problem.prompt_id, "", "", empty_i, samples, messages=list(problem.messages))

    searcher.sample(prompts, s.samples_per_prompt)  # warm-up, not counted
    seconds = {"searcher": 0.0, "completer": 0.0}
    groups = tokens = 0
    for _ in range(args.rounds):
        start = time.perf_counter()
        batch = searcher.sample(prompts, s.samples_per_prompt)
        seconds["searcher"] += time.perf_counter() - start
        texts = [text_only(p, completions) for p, completions in zip(problems, batch, strict=True)]
        start = time.perf_counter()
        for group in texts:
            assert completer.complete(group) is None
        seconds["completer"] += time.perf_counter() - start
        groups += len(texts)
        tokens += sum(x.token_ids.size for g in texts for x in g.samples)
    searcher_rate, completer_rate = groups / seconds["searcher"], groups / seconds["completer"]
    write_results(args.out, {
        "model": "SmolLM2-135M-Instruct (float32)",
        "batch": {"prompts": len(prompts), "samples_per_prompt": s.samples_per_prompt,
                  "max_new_tokens": s.max_new_tokens},
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "searcher_groups_s": round(searcher_rate, 3),
        "completer_groups_s": round(completer_rate, 3),
        "completer_tokens_s": round(tokens / seconds["completer"], 1),
        "searchers_one_filter_keeps_up_with": round(completer_rate / searcher_rate, 1),
    })  # fmt: skip


if __name__ == "__main__":
    main()
