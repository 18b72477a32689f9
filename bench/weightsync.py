"""Weight-sync benchmark on loopback: SmolLM2-shaped bf16 state dicts, subscribers as processes, the
chunked gRPC path (as for a subscriber on another host) and shared memory (one on the service's host),
side by side in one run.

    python bench/weightsync.py  ->  bench/results/weightsync.json

raw_socket_mb_s            one plain TCP socket sending the same bytes, the best of 3 (the reference)
grpc_floor_mb_s            plain gRPC streaming the same number of bytes as 1 MiB messages from another
                           process, no project code: the most the gRPC path could move here
                           (ratio_grpc_floor_vs_raw_socket)
memcpy_mb_s, xxh3_mb_s     one copy of the same bytes between two buffers, one xxh3-128 pass over them
shm_floor_seconds_135m     the least the shared-memory path's work takes at those rates, on one core:
                           the staging copy, the service's xxh3, the subscriber's xxh3 and its copy into
                           its weights (ratio_shm_floor_vs_raw_socket: that floor against the socket)
grpc_mb_s_1, grpc_mb_s_4   a full 135M version from publish() to verified-and-applied in 1 / 4 subscribers
                           (aggregate), through gRPC chunks; ratio_vs_raw_socket = grpc_mb_s_1 / raw
shm_mb_s_1, shm_mb_s_4     the same through shared memory; ratio_shm_vs_raw_socket = shm_mb_s_1 / raw
seconds_per_version_135m   publish() start to applied in the subscriber's weights, 1 subscriber, shared
                           memory (grpc_seconds_per_version_135m: the same through gRPC)
                           Full versions, one after another as a training job publishes them: the median
                           of the versions after the first STEADY_AFTER, once buffers are reused; the
                           first version's figure is *_first_version_*
seconds_per_version_1p7b   the same for a SmolLM2-1.7B-shaped state dict (3.4 GB), shared memory: the
                           second version (staged into the file reserved after the first);
                           first_version_seconds_1p7b: the first
delta_bytes_fraction       after one AdamW step at lr 1e-6: bytes on the wire / full bytes (gRPC)
peak_extra_mb_per_subscriber_{grpc,shm}  a subscriber's private memory grown by holding a version
publish_blocked_s_135m     how long publish() holds the training loop (staging the copy), per path
MB are 10^6 bytes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import write_results  # noqa: E402
from ops.config import load_config, with_overrides  # noqa: E402
from trainer.weight_sync import WeightSyncServer  # noqa: E402

SHAPES = {  # (vocab, hidden, intermediate, layers, heads, kv heads), SmolLM2's, embeddings tied
    "135m": (49152, 576, 1536, 30, 9, 3),
    "1p7b": (49152, 2048, 8192, 24, 32, 32),
}


def llama_config(shape: str):
    from transformers import LlamaConfig

    vocab, hidden, inter, layers, heads, kv = SHAPES[shape]
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048, tie_word_embeddings=True,
    )  # fmt: skip


def smollm2_135m(seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config("135m")).to(torch.bfloat16)


def zeros_shaped(shape: str) -> dict[str, torch.Tensor]:
    """A state dict of the model's shapes, bf16 zeros (content does not change the cost of moving it)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(shape))
    return {
        k: torch.zeros(v.shape, dtype=torch.bfloat16) for k, v in model.state_dict().items() if k != "lm_head.weight"
    }


def private_mb() -> float:
    """This process's anonymous (unshared) resident memory."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1e3
    return 0.0


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


def memory_mb_s(flat) -> tuple[float, float]:
    """(copy, xxh3) MB/s over flat's bytes: the best of 3, into a buffer already mapped."""
    import numpy as np
    import xxhash

    out = np.ones_like(flat)
    copy = min(_timed(lambda: np.copyto(out, flat)) for _ in range(3))
    hashing = min(_timed(lambda: xxhash.xxh3_128(memoryview(flat)).digest()) for _ in range(3))
    return flat.size / copy / 1e6, flat.size / hashing / 1e6


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def subscriber_process(target: str, mode: str, shape: str, versions: int, ready, results) -> None:
    """A searcher: subscribe, apply each version into weights of its own in place, report when done."""
    from producers.weight_subscriber import WeightSubscriber

    torch.set_num_threads(1)
    own = smollm2_135m(seed=1).state_dict() if shape == "135m" else zeros_shaped(shape)
    wcfg = load_config(environ={}, weights={"shared_memory": mode}).weights
    before = private_mb()
    sub = WeightSubscriber(wcfg, target, "bench").start()
    ready.set()
    for v in range(versions):
        got = sub.wait_for(v, 600)
        with torch.no_grad():
            for name, tensor in got.state_dict().items():
                own[name].copy_(tensor)
        results.put((v, time.time(), sub.stats.wire_bytes, private_mb() - before))
    sub.close()


PUBLISH_BLOCKED_S: dict[str, list[float]] = {}  # mode -> how long each publish() held its caller
STEADY_AFTER = 4  # the service keeps 3 versions: the 5th is staged in the 1st one's pages


def push(cfg, mode: str, shape: str, subscribers: int, state_dicts: list) -> list[tuple[float, list]]:
    """A service whose subscribers take the mode's path; publish each state dict (callables: made when their
    turn comes) once all subscribers have the previous. Returns (publish start, reports) per version.
    """
    server = WeightSyncServer(with_overrides(cfg, weights={"shared_memory": mode}), announce=False)
    server.start()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    ready = [ctx.Event() for _ in range(subscribers)]
    args = (server.target, mode, shape, len(state_dicts))
    procs = [ctx.Process(target=subscriber_process, args=(*args, ready[i], results)) for i in range(subscribers)]
    for p in procs:
        p.start()
    for r in ready:
        r.wait(600)
    time.sleep(1.0)  # subscriptions open
    out = []
    for make in state_dicts:
        sd = make()
        start = time.time()
        server.publish(sd, step=len(out))  # stages a copy: sd may change right after
        blocked = time.time() - start
        out.append((start, [results.get(timeout=600) for _ in range(subscribers)]))
        PUBLISH_BLOCKED_S.setdefault(mode, []).append(blocked)
    for p in procs:
        p.join(60)
    server.stop()
    return out


def seconds(pushed) -> tuple[float, float]:
    """(first, steady): publish start to the last subscriber's applied, for the first version and the
    median of those after STEADY_AFTER."""
    took = [max(r[1] for r in reports) - start for start, reports in pushed]
    return took[0], statistics.median(took[STEADY_AFTER:])


def _stream_bytes(nbytes: int, ports) -> None:
    """A gRPC server with one server-streaming method: nbytes as 1 MiB messages (bytes in, bytes out)."""
    from concurrent import futures

    import grpc

    message = bytes(1 << 20)

    def stream(request, context):
        for start in range(0, nbytes, len(message)):
            yield message[: nbytes - start]

    same = lambda b: b  # noqa: E731
    method = grpc.unary_stream_rpc_method_handler(stream, request_deserializer=same, response_serializer=same)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("floor", {"Stream": method}),))
    ports.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination()


def grpc_floor_mb_s(nbytes: int) -> float:
    """The best of 3 plain gRPC streams of nbytes from a server process into this one."""
    import grpc

    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    server = ctx.Process(target=_stream_bytes, args=(nbytes, ports), daemon=True)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{ports.get(timeout=60)}")
    call = channel.unary_stream("/floor/Stream", request_serializer=bytes, response_deserializer=bytes)
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        got = sum(len(m) for m in call(b"", timeout=120))
        best = max(best, got / (time.perf_counter() - start) / 1e6)
    channel.close()
    server.kill()
    return best


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
    result["raw_socket_mb_s"] = max(raw_socket_mb_s(memoryview(flat)) for _ in range(3))
    result["grpc_floor_mb_s"] = grpc_floor_mb_s(nbytes)
    result["ratio_grpc_floor_vs_raw_socket"] = result["grpc_floor_mb_s"] / result["raw_socket_mb_s"]
    result["memcpy_mb_s"], result["xxh3_mb_s"] = memory_mb_s(flat)
    floor = nbytes / 1e6 * (2 / result["memcpy_mb_s"] + 2 / result["xxh3_mb_s"])
    result["shm_floor_seconds_135m"] = floor
    result["ratio_shm_floor_vs_raw_socket"] = nbytes / floor / 1e6 / result["raw_socket_mb_s"]
    del flat

    def one_adamw_step():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        tokens = torch.randint(0, 49152, (2, 32))
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        return model.state_dict()

    full = with_overrides(cfg, weights={"delta": False})  # every version whole, as a new subscriber gets it
    steady = [model.state_dict] * (STEADY_AFTER + 3)
    first, each = seconds(pushed := push(full, "never", "135m", 1, steady))
    result["grpc_first_version_seconds_135m"], result["grpc_seconds_per_version_135m"] = first, each
    result["grpc_mb_s_1"] = nbytes / each / 1e6
    result["ratio_vs_raw_socket"] = result["grpc_mb_s_1"] / result["raw_socket_mb_s"]
    grpc_mb = max(r[0][3] for _, r in pushed)
    _, each = seconds(push(full, "never", "135m", 4, steady))
    result["grpc_mb_s_4"] = 4 * nbytes / each / 1e6
    # one subscriber: a full version, then one AdamW step later the delta
    (_, [(_, _, bytes0, _)]), (start1, [(_, t1, bytes1, _)]) = push(
        cfg, "never", "135m", 1, [model.state_dict, one_adamw_step]
    )
    result["delta_bytes_fraction"] = (bytes1 - bytes0) / bytes0
    result["delta_seconds"] = t1 - start1

    first, each = seconds(pushed := push(full, "auto", "135m", 1, steady))
    result["first_version_seconds_135m"], result["seconds_per_version_135m"] = first, each
    result["shm_mb_s_1"] = nbytes / each / 1e6
    result["ratio_shm_vs_raw_socket"] = result["shm_mb_s_1"] / result["raw_socket_mb_s"]
    shm_mb = max(r[0][3] for _, r in pushed)
    _, each = seconds(pushed := push(full, "auto", "135m", 4, steady))
    result["shm_mb_s_4"] = 4 * nbytes / each / 1e6
    result["publish_blocked_s_135m"] = {
        "shared_memory": statistics.median(PUBLISH_BLOCKED_S["auto"][STEADY_AFTER:]),
        "grpc": statistics.median(PUBLISH_BLOCKED_S["never"][STEADY_AFTER:]),
    }
    result["peak_extra_mb_per_subscriber_grpc"] = grpc_mb
    result["peak_extra_mb_per_subscriber_shm"] = max(shm_mb, max(r[3] for _, reports in pushed for r in reports))
    big = zeros_shaped("1p7b")
    result["bytes_1p7b"] = sum(t.numel() * t.element_size() for t in big.values())
    one_kept = with_overrides(full, weights={"keep_versions": 1})  # two 3.4 GB versions held, not four
    (start0, [(_, t0, _, _)]), (start1, [(_, t1, _, _)]) = push(one_kept, "auto", "1p7b", 1, [lambda: big] * 2)
    result["first_version_seconds_1p7b"], result["seconds_per_version_1p7b"] = t0 - start0, t1 - start1
    result["machine"] = f"{mp.cpu_count()} cores, loopback"

    write_results(args.out, result)


if __name__ == "__main__":
    main()
