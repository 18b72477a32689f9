"""Weight-sync benchmark on loopback: a SmolLM2-135M-shaped bf16 state dict, subscribers as processes.

    python bench/weightsync.py  ->  bench/results/weightsync.json

raw_socket_mb_s           one plain TCP socket sending the same bytes (the limit)
grpc_mb_s_1, grpc_mb_s_4  a full version from publish() to verified-and-loaded in 1 / 4 subscribers (aggregate)
seconds_per_version_135m  publish() start to applied in the subscriber's model, 1 subscriber
delta_bytes_fraction      after one AdamW step at lr 1e-6: bytes on the wire / full bytes, and its seconds
MB are 10^6 bytes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import write_results  # noqa: E402
from ops.config import load_config  # noqa: E402
from trainer.weight_sync import WeightSyncServer  # noqa: E402


def smollm2_135m(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(torch.bfloat16)


def raw_socket_mb_s(payload: memoryview) -> float:
    """One TCP connection on loopback: sendall the bytes, the other end recv_into a buffer."""
    server = socket.create_server(("127.0.0.1", 0))
    sink = bytearray(len(payload))

    def receive():
        conn, _ = server.accept()
        view, got = memoryview(sink), 0
        while got < len(sink):
            got += conn.recv_into(view[got:], min(1 << 20, len(sink) - got))
        conn.close()

    thread = threading.Thread(target=receive)
    thread.start()
    client = socket.create_connection(server.getsockname())
    start = time.perf_counter()
    client.sendall(payload)
    thread.join()
    elapsed = time.perf_counter() - start
    client.close()
    server.close()
    return len(payload) / elapsed / 1e6


def subscriber_process(target: str, versions: int, ready, results) -> None:
    """A searcher: subscribe, apply each version into its own model in place, report when done."""
    from policy.models import load_into
    from producers.weight_subscriber import WeightSubscriber

    torch.set_num_threads(1)
    model = smollm2_135m(seed=1)
    sub = WeightSubscriber(load_config(environ={}).weights, target, "bench").start()
    ready.set()
    for v in range(versions):
        got = sub.wait_for(v, 300)
        load_into(model, got.state_dict())
        results.put((v, time.time(), sub.stats.wire_bytes))
    sub.close()


def push(server: WeightSyncServer, subscribers: int, state_dicts: list) -> list[tuple[float, list]]:
    """Publish each state dict (callables: made when their turn comes) once all subscribers have the previous.

    Returns (publish start, subscriber reports) per version.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    ready = [ctx.Event() for _ in range(subscribers)]
    procs = [
        ctx.Process(target=subscriber_process, args=(server.target, len(state_dicts), ready[i], results))
        for i in range(subscribers)
    ]
    for p in procs:
        p.start()
    for r in ready:
        r.wait(300)
    time.sleep(1.0)  # subscriptions open
    out = []
    for make in state_dicts:
        sd = make()
        start = time.time()
        server.publish(sd, step=len(out))  # stages a copy: sd may change right after
        out.append((start, [results.get(timeout=300) for _ in range(subscribers)]))
    for p in procs:
        p.join(60)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench/results/weightsync.json"))
    args = parser.parse_args()
    cfg = load_config(environ={}, weights={"port": 0})

    model = smollm2_135m()
    from schemas.weights import stage

    _, flat = stage(model.state_dict())
    nbytes = flat.size
    result = {"params": sum(p.numel() for p in model.parameters()), "bytes": int(nbytes), "dtype": "bfloat16"}
    result["raw_socket_mb_s"] = raw_socket_mb_s(memoryview(flat))

    def one_adamw_step():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        tokens = torch.randint(0, 49152, (2, 32))
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        return model.state_dict()

    # one subscriber: a full version, then one AdamW step later the delta
    server = WeightSyncServer(cfg, announce=False)
    server.start()
    (start0, [(_, t0, bytes0)]), (start1, [(_, t1, bytes1)]) = push(server, 1, [model.state_dict, one_adamw_step])
    server.stop()
    result["seconds_per_version_135m"] = t0 - start0
    result["grpc_mb_s_1"] = nbytes / (t0 - start0) / 1e6
    result["ratio_vs_raw_socket"] = result["grpc_mb_s_1"] / result["raw_socket_mb_s"]
    result["delta_bytes_fraction"] = (bytes1 - bytes0) / bytes0
    result["delta_seconds"] = t1 - start1

    server = WeightSyncServer(cfg, announce=False)
    server.start()
    [(start, reports)] = push(server, 4, [model.state_dict])
    server.stop()
    result["grpc_mb_s_4"] = 4 * nbytes / (max(t for _, t, _ in reports) - start) / 1e6
    result["machine"] = f"{mp.cpu_count()} cores, loopback"

    write_results(args.out, result)


if __name__ == "__main__":
    main()
