"""Replay at scale, on a broker of its own: filling a replay buffer from a long curated history and
sampling from it, for 10^4, 10^5 and 10^6 groups.

    python bench/replay_scale.py [--sizes 10000 100000 1000000]  ->  bench/results/replay_scale.json

Per size: synthetic groups written to curated (8 samples of up to 64 tokens; 2 samples of up to 16
tokens for 10^6, to keep the topic near 1 GB), then `CuratedFeed.fill()` from the start
(`fill_groups_s`), `ReplayBuffer.sample()` with the default cache of decoded groups for 4, 16 and 64
prompts (`sample_ms_b*`, the median of 5 draws; evicted groups come from the spill file, and side by side
from Kafka alone: `sample_ms_b64_from_kafka`), and the index's memory per million groups (the spill
file's positions included). On the
largest history, 50 training steps of a tiny model at 64 prompts a step: the trainer's wait fraction
(time waiting for batches / time of the steps), with prefetch (as the trainer runs) and without.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import write_results  # noqa: E402
from ops.broker import LocalBroker, free_port  # noqa: E402
from ops.config import load_config, with_overrides  # noqa: E402
from ops.topics import JobTopics, Topic, create_topics  # noqa: E402
from ops.trajectory_producer import TrajectoryProducer  # noqa: E402
from producers.synthetic import synthetic_group  # noqa: E402
from trainer.curated_feed import CuratedFeed, curated_buffer  # noqa: E402
from trainer.replay_buffer import ReplayBuffer  # noqa: E402

PROMPTS = 20_000
STEPS = 50


def write_history(cfg, curated: Topic, n: int, samples: int, tokens: int) -> float:
    """n groups to curated (a few hundred distinct ones, renamed: generating is not what is measured)."""
    rng = np.random.default_rng(0)
    templates = [synthetic_group(rng, i, samples, tokens, vocab=128) for i in range(256)]
    start = time.perf_counter()
    with TrajectoryProducer(cfg, topic=curated) as producer:
        for i in range(n):
            group = templates[i % len(templates)]
            group.group_id = f"g{i}"
            group.prompt_id = f"p{i % PROMPTS}"
            group.policy_version = i // 10_000
            producer.send(group)
    return n / (time.perf_counter() - start)


def sample_ms(buffer: ReplayBuffer, prompts: int, k: int) -> float:
    times = []
    for _ in range(5):
        start = time.perf_counter()
        buffer.sample(prompts, k)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def wait_fraction(cfg, buffer: ReplayBuffer, k: int, prefetch: bool) -> float:
    """50 steps of a tiny model on the buffer, 64 prompts a step: time waiting for batches / time of the steps.
    With prefetch, as the trainer runs: the next batch is drawn as a step starts and read while it trains."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.train import Trainer

    torch.manual_seed(0)
    tiny = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
    )
    cfg = with_overrides(cfg, trainer={"prompts_per_step": 64, "micro_batch_prompts": 64, "lora_r": 0})
    trainer = Trainer(cfg, tiny, buffer, pad_id=0)
    waiting = total = 0.0
    pending = buffer.prefetch(64, k) if prefetch else None
    for _ in range(STEPS):
        start = time.perf_counter()
        batch = pending.result() if prefetch else buffer.sample(64, k)
        if prefetch:
            pending = buffer.prefetch(64, k)
        drawn = time.perf_counter()
        trainer.train_step(batch)
        waiting += drawn - start
        total += time.perf_counter() - start
    return waiting / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--out", default=str(ROOT / "bench/results/replay_scale.json"))
    args = parser.parse_args()
    result: dict = {"sizes": {}, "prompts": PROMPTS}
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        broker = LocalBroker(Path(tmp) / "kafka", port=port, heap="1g")
        broker.start()
        try:
            base = load_config(environ={}, kafka={"bootstrap": broker.bootstrap, "namespace": "scale"})
            for n in args.sizes:
                samples, tokens = (8, 64) if n < 1_000_000 else (2, 16)
                cfg = with_overrides(base, kafka={"namespace": f"scale{n}"}, buffer={"samples_per_prompt": samples})
                create_topics(cfg)
                curated = JobTopics(cfg).curated
                written = write_history(cfg, curated, n, samples, tokens)
                buffer = curated_buffer(cfg, curated)
                feed = CuratedFeed(cfg, buffer)
                start = time.perf_counter()
                feed.fill()
                fill_s = time.perf_counter() - start
                feed.close()
                row = {"samples_per_group": samples, "max_tokens": tokens, "write_groups_s": round(written),
                       "groups": len(buffer), "fill_groups_s": round(len(buffer) / fill_s),
                       "index_mb_per_million_groups": round(buffer.index_nbytes() / len(buffer), 1)}  # fmt: skip
                for b in (4, 16, 64):
                    row[f"sample_ms_b{b}"] = round(sample_ms(buffer, b, samples), 1)
                # side by side: the same index without the spill file, every evicted group read from Kafka
                from_kafka = curated_buffer(with_overrides(cfg, buffer={"spill_gb": 0}), curated)
                from_kafka.restore(buffer.state())
                row["sample_ms_b64_from_kafka"] = round(sample_ms(from_kafka, 64, samples), 1)
                from_kafka.close()
                row["spill_file_mb"] = round(buffer._reader.spill.size / 2**20, 1)
                if n == max(args.sizes):
                    row["trainer_wait_fraction_no_prefetch"] = round(wait_fraction(cfg, buffer, samples, False), 3)
                    row["trainer_wait_fraction"] = round(wait_fraction(cfg, buffer, samples, True), 3)
                result["sizes"][str(n)] = row
                print(n, row, flush=True)
                buffer.close()
        finally:
            broker.stop()
    largest = result["sizes"][str(max(args.sizes))]
    result.update({
        "largest": max(args.sizes),
        "fill_groups_s_1m": largest["fill_groups_s"],
        "sample_ms_b64_1m": largest["sample_ms_b64"],
        "sample_ms_b64_1m_from_kafka": largest["sample_ms_b64_from_kafka"],
        "trainer_wait_fraction_1m": largest["trainer_wait_fraction"],
        "index_mb_per_million_groups": largest["index_mb_per_million_groups"],
        "cache_groups": base.buffer.cache_groups,
    })  # fmt: skip
    write_results(args.out, result)


if __name__ == "__main__":
    main()
