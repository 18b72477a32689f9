"""Data-plane benchmark: one fresh local broker, 8 KiB groups, every figure measured in this one run.

    python bench/dataplane.py [--groups N]   ->  bench/results/dataplane.json

raw_mb_s        Kafka's own ProducerPerformance (Java, acks=all, 8 KiB, same compression and batching): the limit
produce_mb_s    TrajectoryProducer encoding and publishing real groups     -> ratio_vs_kafka_perf
pipeline_mb_s   produce -> filter group (all default scorers, transactional) -> curated -> ReplayBuffer
latency_ms_*    produce -> sampleable in the ReplayBuffer, at 1,000 groups/s
codec_*         encode / decode records per second
replay_index_mb_per_million_groups   index memory (tracemalloc, decoded-group cache off)
MB are 10^6 bytes of record values before compression.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import write_results  # noqa: E402
from ops.broker import LocalBroker, classpath, free_port  # noqa: E402
from ops.config import TbaConfig, load_config, with_overrides  # noqa: E402
from ops.names import topic_names  # noqa: E402
from ops.topics import JobTopics, create_topics  # noqa: E402
from ops.trajectory_producer import TrajectoryProducer  # noqa: E402
from producers.synthetic import synthetic_group  # noqa: E402
from schemas.codec import SchemaStore  # noqa: E402
from schemas.records import TrajectoryCodec  # noqa: E402
from trainer.curated_feed import CuratedFeed, curated_buffer  # noqa: E402

SAMPLES, TOKENS = 8, 110  # ~8.4 KiB encoded: 8 completions of 55-110 tokens, 12 bytes a token


def make_groups(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [synthetic_group(rng, i % 500, SAMPLES, TOKENS, generator_id="bench") for i in range(n)]


def kafka_perf(cfg: TbaConfig, topic: str, records: int, size: int, compression: str) -> float:
    """Steady-state MB/s of org.apache.kafka.tools.ProducerPerformance (the first 10% is warm-up)."""
    cmd = [
        "java", "-Xmx1g", "-cp", classpath(), "org.apache.kafka.tools.ProducerPerformance",
        "--topic", topic, "--num-records", str(records), "--record-size", str(size), "--throughput", "-1",
        "--warmup-records", str(records // 10), "--command-property", f"bootstrap.servers={cfg.kafka.bootstrap}",
        "acks=all", "enable.idempotence=true", f"compression.type={compression}", "linger.ms=10", "batch.size=1048576",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    last = [line for line in out.splitlines() if "steady state records sent" in line][-1]
    return float(re.search(r"\(([\d.]+) MB/sec\)", last).group(1)) * 1024 * 1024 / 1e6  # its MB is MiB


def measure_produce(cfg: TbaConfig, groups) -> tuple[float, int]:
    with TrajectoryProducer(cfg) as producer:
        size = sum(len(producer.codec.encode(g)) for g in groups[:200]) / 200
        warmup = len(groups) // 10  # as for ProducerPerformance: connections and metadata first
        for g in groups[:warmup]:
            producer.send(g)
        producer.flush()
        start = time.perf_counter()
        for g in groups[warmup:]:
            producer.send(g)
        producer.flush()
        elapsed = time.perf_counter() - start
    return (len(groups) - warmup) * size / elapsed / 1e6, int(size)


def _produce_worker(cfg_json: str, n: int, rate: float | None, seed: int) -> None:
    cfg = TbaConfig.model_validate_json(cfg_json)
    groups = make_groups(n, seed)
    with TrajectoryProducer(cfg) as producer:
        start = time.perf_counter()
        for i, g in enumerate(groups):
            if rate:
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            g.created_at = int(time.time() * 1000)
            producer.send(g)


def start_filters(cfg: TbaConfig, instances: int, idle_exit: float) -> list[subprocess.Popen]:
    env = {**os.environ, "TBA__KAFKA__BOOTSTRAP": cfg.kafka.bootstrap, "TBA__KAFKA__NAMESPACE": cfg.kafka.namespace}
    cmd = [sys.executable, "-m", "tba.cli", "filter", "--idle-exit", str(idle_exit)]
    return [
        subprocess.Popen([*cmd, "--instance", str(i)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        for i in range(instances)
    ]


def stop_filters(filters: list[subprocess.Popen]) -> None:
    for f in filters:
        f.terminate()  # SIGTERM: the filter finishes its transaction and leaves
    for f in filters:
        f.wait(timeout=60)


def measure_pipeline(cfg: TbaConfig, n: int, size: int, instances: int) -> dict:
    """All stages at once: a producer process, filter processes, the buffer fed in this process."""
    filters = start_filters(cfg, instances, idle_exit=600)
    time.sleep(3)  # let the filters join the group before the clock starts
    buffer = curated_buffer(with_overrides(cfg, buffer={"cache_groups": 1000}), JobTopics(cfg).curated)
    feed = CuratedFeed(cfg, buffer)
    producer = mp.get_context("spawn").Process(target=_produce_worker, args=(cfg.model_dump_json(), n, None, 1))
    start = time.perf_counter()
    producer.start()
    while len(buffer) < n and time.perf_counter() - start < 600:
        feed.poll(100)
    elapsed = time.perf_counter() - start
    producer.join()
    stop_filters(filters)
    feed.close()
    return {"pipeline_mb_s": n * size / elapsed / 1e6, "pipeline_groups_s": n / elapsed, "pipeline_groups": len(buffer)}


def measure_latency(cfg: TbaConfig, rate: float, seconds: float, instances: int) -> dict:
    n = int(rate * seconds)
    filters = start_filters(cfg, instances, idle_exit=600)
    buffer = curated_buffer(with_overrides(cfg, buffer={"cache_groups": 100}), JobTopics(cfg).curated)
    feed = CuratedFeed(cfg, buffer)
    time.sleep(3)
    producer = mp.get_context("spawn").Process(target=_produce_worker, args=(cfg.model_dump_json(), n, rate, 2))
    producer.start()
    latencies = []
    deadline = time.monotonic() + seconds + 60
    while len(latencies) < n and time.monotonic() < deadline:
        for records in feed.consumer.poll(timeout_ms=20).values():
            for rec in records:
                group = buffer.codec.decode(rec.value)
                if buffer.add(rec.partition, rec.offset, group):
                    latencies.append(time.time() * 1000 - group.created_at)  # now sampleable
    producer.join()
    stop_filters(filters)
    feed.close()
    warm = np.array(latencies[int(rate) :])  # drop the first second (connections, JIT of the broker)
    return {
        "latency_rate_groups_s": rate,
        "latency_ms_p50": float(np.percentile(warm, 50)),
        "latency_ms_p99": float(np.percentile(warm, 99)),
        "latency_groups": len(latencies),
    }


def measure_codec(groups) -> dict:
    codec = TrajectoryCodec(SchemaStore())
    start = time.perf_counter()
    blobs = [codec.encode(g) for g in groups]
    enc = len(groups) / (time.perf_counter() - start)
    start = time.perf_counter()
    for b in blobs:
        codec.decode(b)
    dec = len(groups) / (time.perf_counter() - start)
    return {"codec_encode_records_s": enc, "codec_decode_records_s": dec}


def measure_index(n: int) -> dict:
    cfg = load_config(environ={}, kafka={"namespace": "bench-index"}, buffer={"cache_groups": 0, "spill_gb": 0})
    rng = np.random.default_rng(3)
    template = synthetic_group(rng, 0, SAMPLES, TOKENS)
    curated = JobTopics(cfg, SchemaStore()).curated
    tracemalloc.start()
    buffer = curated_buffer(cfg, curated)  # index only: no Kafka client is made until a group is read back
    base = tracemalloc.get_traced_memory()[0]
    for i in range(n):
        template.prompt_id = f"prompt-{i % 20_000}"
        template.policy_version = i // 10_000
        for s in template.samples:  # fresh content hashes without generating new groups
            s.token_ids = s.token_ids.copy()
            s.token_ids[0] = i
        buffer.add(i % 4, i // 4, template)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return {
        "replay_index_mb_per_million_groups": used / n * 1e6 / 1e6,
        "replay_index_groups_measured": n,
        "replay_index_samples_per_group": SAMPLES,
        "replay_index_prompts": 20_000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=20_000)
    parser.add_argument("--filters", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench/results/dataplane.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        broker = LocalBroker(Path(tmp) / "kafka", port=free_port())
        broker.start()
        try:
            base = load_config(environ={}, kafka={"bootstrap": broker.bootstrap, "namespace": "bench"})
            result: dict = {"groups": args.groups, "samples_per_group": SAMPLES, "filter_instances": args.filters}
            groups = make_groups(args.groups)

            def fresh(name: str) -> TbaConfig:
                cfg = with_overrides(base, kafka={"namespace": f"bench-{name}"})
                create_topics(cfg)
                return cfg

            cfg = fresh("produce")
            produce_mb_s, size = measure_produce(cfg, groups)
            result["group_bytes"] = size
            comp = cfg.topics.compression
            result["raw_mb_s"] = kafka_perf(cfg, topic_names(fresh("perf")).raw, args.groups, size, comp)
            result["raw_mb_s_uncompressed"] = kafka_perf(
                cfg, topic_names(fresh("perf0")).raw, args.groups, size, "none"
            )
            result["produce_mb_s"] = produce_mb_s
            result["ratio_vs_kafka_perf"] = produce_mb_s / result["raw_mb_s"]
            print(json.dumps(result), flush=True)
            result.update(measure_pipeline(fresh("pipeline"), args.groups, size, args.filters))
            result["pipeline_ratio"] = result["pipeline_mb_s"] / result["raw_mb_s"]
            result.update(measure_latency(fresh("latency"), rate=1000, seconds=10, instances=args.filters))
            # below the pipeline's capacity on this machine, for the unsaturated latency
            light = measure_latency(fresh("latency-light"), rate=250, seconds=10, instances=args.filters)
            result.update({f"light_{k}": v for k, v in light.items()})
            result.update(measure_codec(groups[:5000]))
        finally:
            broker.stop()
    result.update(measure_index(200_000))
    result["compression"] = comp
    result["machine"] = f"{os.cpu_count()} cores"
    write_results(args.out, result)


if __name__ == "__main__":
    main()
