"""A job trained through the OpenAI-compatible gateway alone: agents (examples/gateway_agent.py) ask, verify and
post rewards; no searcher runs. Does the reward rise, how many requests a second does the gateway serve,
and how much time does it add over the generation itself?

    python bench/gateway.py [--clients 4] [--learn-s 600]  ->  bench/results/gateway.json

`tba run` (tiny random model, toy task: "say some digits", rewarded by the share of digits) starts the
gateway instead of searchers; `--clients` agent threads call it with the official `openai` client for
`--learn-s` seconds. reward_start / reward_end: the mean reward of the first and last `--window` rounds.
Then, against the same gateway in the same run, `--clients` concurrent clients send `--requests` more
requests each and read the gateway's `Server-Timing` header (queue, generate, app). The time the
gateway adds over the bare generation of the same request, `gateway_overhead_ms`, is its time in the
app less the generation of the batch it rode in and less its wait for that batch to begin (`queue_ms`:
earlier batches still generating). `client_seen_overhead_ms` is the same taken from the latency the
client measured: it adds loopback, uvicorn's HTTP parsing and the client's own work (the openai
client parsing its answer, in threads of one Python process).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import write_results  # noqa: E402
from tests.gateway_job import gateway_job, run_agents  # noqa: E402


def server_timing(header: str) -> dict[str, float]:
    """'generate;dur=12.5, queue;dur=0.3' -> {'generate': 12.5, 'queue': 0.3} (milliseconds)."""
    out = {}
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur":
                out[name] = float(value)
    return out


def overhead(client, clients: int, requests: int) -> dict:
    """Concurrent requests of an agent's shape; per request: latency, the batch's generation, its queueing."""
    model = client.models.list().data[0].id
    samples, lock = [], threading.Lock()

    def one_client() -> None:
        for i in range(requests):
            start = time.perf_counter()
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": f"Say some digits ({i})."}], n=6, max_tokens=6
            )
            latency = (time.perf_counter() - start) * 1000
            timing = server_timing(raw.headers.get("server-timing", ""))
            response = raw.parse()
            client.post("/rewards", body={"id": response.id, "rewards": [0.0] * 6}, cast_to=object)
            with lock:
                samples.append((start, latency, timing["generate"], timing["queue"], timing["app"]))

    threads = [threading.Thread(target=one_client) for _ in range(clients)]
    begun = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - begun
    latency, generate, queue, app = (np.array([s[k] for s in samples]) for k in (1, 2, 3, 4))

    def ms(values, q) -> float:
        return round(float(np.percentile(values, q)), 2)

    return {
        "requests_s": round(len(samples) / elapsed, 2),
        "latency_ms_p50": ms(latency, 50),
        "generate_ms_p50": ms(generate, 50),
        "queue_ms_p50": ms(queue, 50),
        "gateway_overhead_ms_p50": ms(app - generate - queue, 50),
        "gateway_overhead_ms_p99": ms(app - generate - queue, 99),
        "client_seen_overhead_ms_p50": ms(latency - generate - queue, 50),
        "client_seen_overhead_ms_p99": ms(latency - generate - queue, 99),
        "overhead_requests": len(samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--learn-s", type=float, default=600)
    parser.add_argument("--window", type=int, default=40, help="rounds averaged at the start and at the end")
    parser.add_argument("--requests", type=int, default=50, help="per client, for the overhead")
    parser.add_argument("--out", default=str(ROOT / "bench/results/gateway.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, gateway_job(Path(tmp), budget_s=args.learn_s + 600) as (cfg, client):
        rounds = run_agents(client, args.clients, args.learn_s)
        speed = overhead(client, args.clients, args.requests)
    mean = [float(np.mean(r["rewards"])) for r in rounds]
    start, end = float(np.mean(mean[: args.window])), float(np.mean(mean[-args.window :]))
    write_results(args.out, {
        "setup": "tba run, gateway instead of searchers; tiny random Llama (char vocabulary), toy task; "
                 f"{args.clients} agent threads, n=6 completions of <= 6 tokens a request",
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "learn_s": args.learn_s,
        "clients": args.clients,
        "groups": len(rounds),
        "reward_start": round(start, 3),
        "reward_end": round(end, 3),
        "reward_gain": round(end - start, 3),
        "last_policy_version": max(r["policy_version"] for r in rounds),
        "agent_requests_s": round(len(rounds) / args.learn_s, 2),
        **speed,
    })  # fmt: skip


if __name__ == "__main__":
    main()
