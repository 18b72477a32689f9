"""Weight sync over real gRPC on loopback (port 0), with tiny models."""

import dataclasses
import subprocess

import grpc
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ops.config import with_overrides
from ops.errors import TbaError
from ops.names import topic_names
from ops.topics import KafkaSchemaStore, read_topic
from policy.models import load_into
from producers.weight_subscriber import WeightSubscriber
from schemas.chunk_wire import DataChunk
from schemas.records import PolicyVersionCodec
from trainer.weight_sync import WeightSyncServer, publish_remote


def tiny_llama(seed: int, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(dtype).eval()


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() <= b.keys() and all(
        torch.equal(a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8)) for k in a
    )


@pytest.fixture
def wcfg(cfg):
    # the chunked gRPC path, as for a subscriber on another host (shared memory: tests/test_weight_sync_shm.py)
    return with_overrides(cfg, weights={"port": 0, "chunk_bytes": 4096, "subscription_s": 5, "shared_memory": "never"})


@pytest.fixture
def server(wcfg):
    srv = WeightSyncServer(wcfg)
    srv.start()
    yield srv
    srv.stop()


def subscribe(wcfg, server, name="s", **kw) -> WeightSubscriber:
    return WeightSubscriber(wcfg.weights, server.target, name, **kw).start()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(wcfg, server, dtype):
    model = tiny_llama(0, dtype)
    sub = subscribe(wcfg, server)
    version = server.publish(model.state_dict(), step=10, model_id="tiny")
    got = sub.wait_for(version, 20)
    assert got.version == version and got.step == 10 and got.model_id == "tiny"
    assert same_bits(got.state_dict(), {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"})
    assert got.dtype == str(dtype).removeprefix("torch.")
    sub.close()


def test_a_late_subscriber_gets_the_latest_version_only(wcfg, server):
    for seed in range(3):
        server.wait_published(server.publish(tiny_llama(seed).state_dict(), step=seed))
    sub = subscribe(wcfg, server)
    assert sub.wait_for(2, 20).step == 2
    assert list(sub.stats.received) == [2]
    sub.close()


def test_three_subscribers_see_versions_in_order(wcfg, server):
    subs = [subscribe(wcfg, server, f"s{i}") for i in range(3)]
    for seed in range(6):
        server.publish(tiny_llama(seed).state_dict(), step=seed)
    for sub in subs:
        assert sub.wait_for(5, 30).version == 5
        received = list(sub.stats.received)
        assert received == sorted(set(received)) and received[-1] == 5  # increasing; skips only superseded
        sub.close()


class ChangeOnce(grpc.UnaryStreamClientInterceptor):
    """Changes the first data chunk the subscriber receives, with change(chunk) -> chunk."""

    def __init__(self, change):
        self.change = change
        self.done = False

    def intercept_unary_stream(self, continuation, details, request):
        call = continuation(details, request)
        interceptor = self

        class Stream:
            def __iter__(self):
                for chunk in call:
                    if not interceptor.done and isinstance(chunk, DataChunk) and len(chunk.data):
                        chunk = interceptor.change(chunk)
                        interceptor.done = True
                    yield chunk

            def cancel(self):
                return call.cancel()

        return Stream()


def corrupt_once() -> ChangeOnce:
    """One byte of the first data chunk flipped: a corrupted transfer."""

    def flip(chunk):
        data = bytearray(chunk.data)
        data[0] ^= 0xFF
        return dataclasses.replace(chunk, data=bytes(data))

    return ChangeOnce(flip)


def malform_once() -> ChangeOnce:
    """The first data chunk moved past its tensor's end: a stream that breaks the protocol."""
    return ChangeOnce(lambda chunk: dataclasses.replace(chunk, offset=chunk.offset + (1 << 40)))


def test_a_corrupted_chunk_is_rejected_and_fetched_again(wcfg, server):
    model = tiny_llama(1)
    sub = subscribe(wcfg, server, interceptors=[corrupt_once()])
    version = server.publish(model.state_dict(), step=1)
    got = sub.wait_for(version, 20)
    assert sub.stats.checksum_failures == 1
    assert same_bits(got.state_dict(), {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"})
    sub.close()


def test_a_malformed_stream_is_dropped_and_subscribed_again(wcfg, server):
    sub = subscribe(wcfg, server, interceptors=[malform_once()])
    first = server.publish(tiny_llama(1).state_dict(), step=1)
    assert sub.wait_for(first, 20).version == first and sub.stats.malformed == 1
    model = tiny_llama(2)
    second = server.publish(model.state_dict(), step=2)  # and the next version arrives as usual
    got = sub.wait_for(second, 20)
    assert same_bits(got.state_dict(), {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"})
    assert sub.error is None and sub.take().version == second
    sub.close()


def test_a_subscriber_that_stopped_says_why_to_its_process(wcfg, server, monkeypatch):
    sub = WeightSubscriber(wcfg.weights, server.target, "s")
    monkeypatch.setattr(sub, "_subscribe_once", lambda: 1 / 0)  # a bug in the background thread
    sub.start()
    with pytest.raises(TbaError, match="weight subscriber stopped: ZeroDivisionError"):
        sub.wait_for(0, 20)
    with pytest.raises(TbaError, match="weight subscriber stopped"):
        sub.take()  # the searcher's next batch: its process goes down with the line, and is restarted
    sub.close()


def test_delta_mode_reproduces_the_full_weights_with_fewer_bytes(wcfg, server):
    model = tiny_llama(2, torch.bfloat16)
    sub = subscribe(wcfg, server)
    sub.wait_for(server.publish(model.state_dict(), step=0), 20)
    full_bytes = sub.stats.wire_bytes
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model(torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    optimizer.step()
    got = sub.wait_for(server.publish(model.state_dict(), step=1), 20)
    assert same_bits(got.state_dict(), {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"})
    delta_bytes = sub.stats.wire_bytes - full_bytes
    assert 0 < delta_bytes < 0.5 * full_bytes
    sub.close()


def test_hf_model_generates_like_the_published_weights_after_the_swap(wcfg, server):
    searcher_model, trained = tiny_llama(3), tiny_llama(4)
    prompt = torch.tensor([[5, 6, 7, 8]])
    assert not torch.equal(searcher_model(prompt).logits, trained(prompt).logits)
    sub = subscribe(wcfg, server)
    server.publish(trained.state_dict(), step=1)
    sub.wait_for(0, 20)
    load_into(searcher_model, sub.take().state_dict())
    assert sub.take() is None  # nothing newer yet
    assert torch.equal(searcher_model(prompt).logits, trained(prompt).logits)
    assert torch.equal(
        searcher_model.generate(prompt, max_new_tokens=6, do_sample=False),
        trained.generate(prompt, max_new_tokens=6, do_sample=False),
    )
    sub.close()


def test_subscribers_resume_after_the_server_restarts(wcfg):
    first = WeightSyncServer(wcfg)
    port = first.start()
    sub = WeightSubscriber(wcfg.weights, first.target, "s").start()
    sub.wait_for(first.publish(tiny_llama(5).state_dict(), step=1), 20)
    first.stop()
    second = WeightSyncServer(with_overrides(wcfg, weights={"port": port}))
    second.start()
    model = tiny_llama(6)
    got = sub.wait_for(second.publish(model.state_dict(), step=2, version=1), 30)
    assert got.version == 1 and sub.stats.reconnects >= 1
    assert same_bits(got.state_dict(), {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"})
    sub.close()
    second.stop()


def test_versions_are_announced_on_the_policy_versions_topic(wcfg, server):
    for seed in range(2):
        server.wait_published(server.publish(tiny_llama(seed).state_dict(), step=seed * 2))
    server.stop()  # flushes the announcements
    codec = PolicyVersionCodec(KafkaSchemaStore(wcfg))
    announced = [codec.decode(r.value) for r in read_topic(wcfg, topic_names(wcfg).policy_versions)]
    assert [(a["version"], a["step"]) for a in announced] == [(0, 0), (1, 2)]
    assert announced[-1]["sha256"] == server.latest.sha256.hex()


def test_tokens_are_checked_on_every_call(wcfg, monkeypatch):
    monkeypatch.setenv("TBA_WEIGHTS_PUBLISH_TOKEN", "trainer-secret")
    monkeypatch.setenv("TBA_WEIGHTS_SUBSCRIBE_TOKEN", "searcher-secret")
    srv = WeightSyncServer(wcfg)
    srv.start()
    model = tiny_llama(7)
    assert publish_remote(wcfg, srv.target, model.state_dict(), version=0, step=0) == 0  # trainer's token
    good = WeightSubscriber(wcfg.weights, srv.target, "good").start()
    assert good.wait_for(0, 20).version == 0
    good.close()

    monkeypatch.setenv("TBA_WEIGHTS_SUBSCRIBE_TOKEN", "wrong")
    monkeypatch.setenv("TBA_WEIGHTS_PUBLISH_TOKEN", "")
    bad = WeightSubscriber(wcfg.weights, srv.target, "bad").start()
    with pytest.raises(TbaError, match="refused this subscriber: wrong bearer token"):
        bad.wait_for(0, 20)
    bad.close()
    monkeypatch.delenv("TBA_WEIGHTS_SUBSCRIBE_TOKEN")
    anonymous = WeightSubscriber(wcfg.weights, srv.target, "anon").start()
    with pytest.raises(TbaError, match="missing bearer token"):
        anonymous.wait_for(0, 20)
    anonymous.close()
    # a searcher's token cannot publish
    monkeypatch.setenv("TBA_WEIGHTS_PUBLISH_TOKEN", "searcher-secret")
    with pytest.raises(grpc.RpcError) as refused:
        publish_remote(wcfg, srv.target, model.state_dict(), version=1, step=1)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    srv.stop()


def make_cert(tmp_path):
    key, cert = tmp_path / "server.key", tmp_path / "server.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


def test_tls_server_refuses_plaintext_and_serves_tls_clients(wcfg, tmp_path):
    key, cert = make_cert(tmp_path)
    tls = with_overrides(wcfg, weights={"tls_cert": str(cert), "tls_key": str(key)})
    srv = WeightSyncServer(tls)
    srv.start()
    version = srv.publish(tiny_llama(8).state_dict(), step=0)
    plain = WeightSubscriber(
        tls.weights.model_copy(update={"tls_cert": None, "tls_key": None}), srv.target, "p"
    ).start()
    with pytest.raises(TimeoutError):
        plain.wait_for(version, 3)
    assert plain.stats.versions == 0 and plain.stats.reconnects >= 1
    plain.close()
    client = with_overrides(tls, weights={"tls_ca": str(cert)})
    secure = WeightSubscriber(client.weights, srv.target, "tls").start()
    assert secure.wait_for(version, 20).version == version
    secure.close()
    srv.stop()


def test_tba_weights_serve_runs_the_service_on_its_own(wcfg):
    import os
    import signal
    import sys

    from ops.broker import free_port

    port = free_port()
    env = {
        **os.environ,
        "TBA__KAFKA__BOOTSTRAP": wcfg.kafka.bootstrap,
        "TBA__KAFKA__NAMESPACE": wcfg.kafka.namespace,
        "TBA__WEIGHTS__PORT": str(port),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tba.cli", "weights", "serve"], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == f"weight sync serving on 127.0.0.1:{port}"
    model = tiny_llama(9)
    target = f"127.0.0.1:{port}"
    assert publish_remote(wcfg, target, model.state_dict(), version=3, step=30) == 3
    sub = WeightSubscriber(wcfg.weights, target, "s").start()
    got = sub.wait_for(3, 20)
    assert got.step == 30
    assert same_bits(got.state_dict(), {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"})
    sub.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


def test_committed_grpc_stubs_match_the_proto(tmp_path):
    import shutil
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    (tmp_path / "schemas").mkdir()
    shutil.copy(root / "schemas" / "weight_sync.proto", tmp_path / "schemas")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path}", f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", "schemas/weight_sync.proto"],
        check=True,
    )  # fmt: skip
    for name in ("weight_sync_pb2.py", "weight_sync_pb2_grpc.py"):
        assert (tmp_path / "schemas" / name).read_text() == (root / "schemas" / name).read_text(), (
            f"schemas/{name} is stale: run python schemas/gen_protos.py"
        )


def test_publishing_only_some_tensors_updates_only_those(wcfg, server):
    """As when training LoRA adapters or a subset of layers: publish the trainable tensors alone."""
    searcher_model, trained = tiny_llama(10), tiny_llama(11)
    trainable = {k: v for k, v in trained.state_dict().items() if ".self_attn.q_proj." in k}
    before = {k: v.clone() for k, v in searcher_model.state_dict().items()}
    sub = subscribe(wcfg, server)
    server.publish(trainable, step=1)
    load_into(searcher_model, sub.wait_for(0, 20).state_dict())
    after = searcher_model.state_dict()
    assert all(torch.equal(after[k], trainable[k]) for k in trainable)
    assert all(torch.equal(after[k], before[k]) for k in before if k not in trainable)
    with pytest.raises(TbaError, match="tensors this model lacks"):
        load_into(searcher_model, {"not.a.tensor": torch.zeros(1)})
    sub.close()


def test_an_unchanged_version_arrives_as_its_header_alone(wcfg, server):
    """Weights published again unchanged (a step that skipped the update): every tensor UNCHANGED, no data
    chunk follows, and the subscriber still gets the version, checked against the xxh3 after the header."""
    model = tiny_llama(5)
    sub = subscribe(wcfg, server)
    sub.wait_for(server.publish(model.state_dict(), step=0), 20)
    full_bytes = sub.stats.wire_bytes
    got = sub.wait_for(server.publish(model.state_dict(), step=1), 20)
    assert got.version == 1 and got.step == 1 and sub.stats.wire_bytes == full_bytes
    assert same_bits(got.state_dict(), {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"})
    sub.close()
