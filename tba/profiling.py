"""Where a role's time goes. With TBA_PROFILE_DIR set, every `tba` command runs under cProfile and writes
DIR/tba-<pid>.pstats when it exits (a role that `tba run` stops exits normally and writes it; one killed does
not); time_split() reads one back as the seconds of each phase of a searcher batch or a trainer step.

cProfile sees the main thread (Python 3.11), where each role's loop runs, not Kafka's or gRPC's I/O threads; it adds a
little to every Python call: the phases' shares are what to read, more than their absolute seconds.
"""

from __future__ import annotations

import cProfile
import os
import pstats
from collections.abc import Callable
from pathlib import Path

PROFILE_DIR_ENV = "TBA_PROFILE_DIR"

# phase -> (the end of its file's path, function): the role's unit of work first, then what it spends it on
SEARCHER_PHASES = {
    "batch": ("producers/searcher.py", "step"),  # one searcher batch, all of it
    "generation": ("policy/generation.py", "complete"),  # sampling, behaviour log-probs included
    "reference_pass": ("policy/logprobs.py", "completions_token_logprobs"),
    "reward": ("policy/tasks/__init__.py", "scored_samples"),
    "kafka_send": ("ops/trajectory_producer.py", "send"),  # Avro encoding and the producer's accumulator
    "kafka_flush": ("ops/trajectory_producer.py", "flush"),  # waiting for raw's acks
    "prompts_take": ("producers/prompt_feed.py", "take"),
    "prompts_commit": ("producers/prompt_feed.py", "commit"),
    "weight_swap": ("producers/generators.py", "swap_in_newest"),
}
TRAINER_PHASES = {
    "step": ("trainer/train.py", "train_step"),  # one optimizer step, all of it
    "forward": ("policy/logprobs.py", "completion_logits"),
    "log_softmax": ("policy/logprobs.py", "token_logprobs"),
    "loss": ("trainer/tb_loss.py", "tb_loss"),
    "backward": ("torch/_tensor.py", "backward"),
    "clip_grad": ("torch/nn/utils/clip_grad.py", "clip_grad_norm_"),
    "optimizer": ("torch/optim/adam.py", "step"),  # AdamW's step is Adam's
    "publish": ("trainer/train.py", "publish"),
    # the loop around the steps
    "next_batch": ("trainer/job.py", "from_buffer"),  # polling curated, the replay bound's wait, drawing
    "evaluation": ("trainer/evaluation.py", "__call__"),
    "checkpoint": ("trainer/checkpoint.py", "save"),
}


def profiled(command: Callable[[], None]) -> None:
    """command(), under cProfile when TBA_PROFILE_DIR is set; the profile is written however it exits."""
    directory = os.environ.get(PROFILE_DIR_ENV)
    if not directory:
        return command()
    profiler = cProfile.Profile()
    try:
        profiler.runcall(command)
    finally:
        path = Path(directory) / f"tba-{os.getpid()}.pstats"
        path.parent.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(f"{path}.part")  # whole or not there: a kill may come while it writes
        os.replace(f"{path}.part", path)


def time_split(path: str | Path) -> dict:
    """A profile's role ("searcher", "trainer" or None for any other command), the seconds it covers, and for
    each phase its seconds and calls (a function called inside another counts in both)."""
    # (file, line, function) -> (primitive calls, calls, own seconds, cumulative seconds, callers)
    stats = pstats.Stats(str(path)).stats
    seconds = sum(own for _, _, own, _, _ in stats.values())

    def phase(file: str, function: str) -> dict:
        where = "/" + file
        hits = [(n, cum) for (f, _, fn), (_, n, _, cum, _) in stats.items() if fn == function and f.endswith(where)]
        return {"seconds": sum(cum for _, cum in hits), "calls": sum(n for n, _ in hits)}

    for role, phases in (("searcher", SEARCHER_PHASES), ("trainer", TRAINER_PHASES)):
        split = {name: phase(*where) for name, where in phases.items()}
        if next(iter(split.values()))["calls"]:
            return {"role": role, "seconds": seconds, "phases": split}
    return {"role": None, "seconds": seconds, "phases": {}}
