"""The OpenAI-compatible gateway, served by uvicorn on a free port and called with the official `openai`
client: a tiny random model answers, rewards posted back put groups in raw, unrewarded groups expire to
the dlq, weights published through the weight-sync service reach it."""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import numpy as np
import openai
import pytest
import torch

from ops.broker import free_port
from ops.config import TbaConfig, load_config, with_overrides
from ops.errors import ConfigError
from ops.metrics import gateway_metrics
from ops.names import topic_names
from ops.topics import KafkaSchemaStore, create_topics, read_topic
from policy.generation import Completion, HFGenerator
from policy.logprobs import token_logprobs
from policy.models import chat_prompt_ids
from producers.gateway import Gateway, GatewayServer
from producers.gateway_batcher import cut_at_stop
from producers.generators import build_generator, weight_subscriber
from schemas.records import DeadLetterCodec, TrajectoryCodec
from tba.live_view import JobView, scrape
from tba.supervisor import role_processes
from tests.conftest import make_config
from tests.tiny_models import char_tokenizer, saved_tiny_llama, tiny_llama
from trainer.weight_sync import WeightSyncServer

TOKEN_ENV = "TBA_TEST_GATEWAY_TOKEN"
TOKEN = "test-token-5b1e"
HELLO = [{"role": "user", "content": "Say hi."}]


@dataclass
class Served:
    cfg: TbaConfig
    gateway: Gateway
    url: str
    client: openai.OpenAI

    def post_rewards(self, body: dict) -> httpx.Response:
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        # json.dumps writes NaN and Infinity, as some clients do (httpx's json= refuses them)
        return httpx.post(f"{self.url}/rewards", content=json.dumps(body), headers=headers, timeout=30)

    def raw_group(self, group_id: str):
        codec = TrajectoryCodec(KafkaSchemaStore(self.cfg))
        groups = [codec.decode(r.value) for r in read_topic(self.cfg, topic_names(self.cfg).raw)]
        return next(g for g in groups if g.group_id == group_id)

    def ready(self) -> "Served":
        while not self.gateway.batcher.ready:
            time.sleep(0.05)
        return self


def dead_letters(cfg: TbaConfig) -> list:
    codec = DeadLetterCodec(KafkaSchemaStore(cfg))
    return [codec.decode(r.value) for r in read_topic(cfg, topic_names(cfg).dlq)]


@contextmanager
def serving(cfg: TbaConfig, load_policy, subscriber=None):
    with pytest.MonkeyPatch.context() as env:
        env.setenv(TOKEN_ENV, TOKEN)
        server = GatewayServer(Gateway(cfg, load_policy, subscriber), "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{server.port}/v1"
    try:
        yield Served(cfg, server.gateway, url, openai.OpenAI(base_url=url, api_key=TOKEN, max_retries=0))
    finally:
        server.stop()


def gateway_config(broker, **gateway) -> TbaConfig:
    settings = {"enabled": True, "token_env": TOKEN_ENV, "batch_wait_ms": 100, "max_tokens": 8, **gateway}
    cfg = make_config(broker.bootstrap, weights={"port": 0, "subscription_s": 5}, gateway=settings)
    create_topics(cfg)
    return cfg


@pytest.fixture(scope="module")
def job(broker, tmp_path_factory):
    """The gateway as `tba gateway` builds it, on a saved tiny model, with a weight-sync service to publish to."""
    path = saved_tiny_llama(tmp_path_factory.mktemp("gateway-model"))
    cfg = with_overrides(gateway_config(broker), searcher={"model": path, "searchers": 0})
    weights = WeightSyncServer(cfg)
    cfg = with_overrides(cfg, weights={"port": weights.start()})
    with serving(cfg, lambda: build_generator(cfg, 0, with_reference=False), weight_subscriber(cfg, "gateway")) as s:
        yield s.ready(), weights
    weights.stop()


@pytest.fixture
def served(job) -> Served:
    return job[0]


def test_complete_takes_behaviour_logprobs_from_the_generation_pass_itself():
    """Sampled at a temperature, the log-probs are a forward pass's at that temperature; greedy, untempered."""
    tokenizer, policy = char_tokenizer(), tiny_llama(0)
    gen = HFGenerator(policy, tokenizer, None, temperature=0.7, max_new_tokens=6)
    prompts = [gen.prompt_ids([{"role": "user", "content": q}]) for q in ("What is 2+2?", "Hi")]
    torch.manual_seed(0)
    for temperature in (0.7, 0.0):
        groups = gen.complete(prompts, 2, temperature, 10, top_logprobs=3)
        for prompt, group in zip(prompts, groups, strict=True):
            for c in group:
                assert c.token_ids.size == c.logprobs.size > 0 and c.ref_logprobs.size == 0
                seq = torch.tensor([prompt + c.token_ids.tolist()])
                logits = policy(seq).logits[:, len(prompt) - 1 : -1]
                expected = token_logprobs(logits, seq[:, len(prompt) :], temperature or 1.0)[0].detach().numpy()
                np.testing.assert_allclose(c.logprobs, expected, atol=1e-4)
                assert c.top_ids.shape == c.top_logprobs.shape == (c.token_ids.size, 3)
                assert (np.diff(c.top_logprobs, axis=1) <= 0).all()  # best first
                assert (c.top_logprobs[:, 0] >= c.logprobs - 1e-6).all()
                if temperature == 0:  # greedy takes the most likely token
                    np.testing.assert_array_equal(c.top_ids[:, 0], c.token_ids)


def test_chat_n_completions_are_one_group_that_reaches_raw_once_rewarded(served):
    response = served.client.chat.completions.create(
        model=served.gateway.model_id, messages=HELLO, n=3, temperature=0.9, logprobs=True, top_logprobs=2
    )
    assert response.object == "chat.completion" and response.model == served.gateway.model_id
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert response.usage.prompt_tokens == len(chat_prompt_ids(char_tokenizer(), HELLO))
    for choice in response.choices:
        assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
        assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    answer = served.post_rewards({"id": response.id, "rewards": [1.0, 0.0, 0.5]})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"id": response.id, "status": "produced", "policy_version": served.gateway.policy_version}

    group = served.raw_group(response.id)  # acknowledged: already in Kafka
    assert group.task == "gateway" and group.generator_id == "gateway" and group.model_id == served.gateway.model_id
    assert group.metadata == {"temperature": "0.9", "source": "gateway"}
    assert group.prompt_token_ids.tolist() == chat_prompt_ids(char_tokenizer(), HELLO)
    assert [s.reward for s in group.samples] == [1.0, 0.0, 0.5]
    for sample, choice in zip(group.samples, response.choices, strict=True):
        assert sample.completion == choice.message.content and sample.ref_logprobs.size == 0
        assert sample.token_ids.size == sample.logprobs.size > 0 and sample.finish_reason == choice.finish_reason
        shown = [t.logprob for t in choice.logprobs.content]  # the text's tokens: all but a final EOS
        np.testing.assert_allclose(sample.logprobs[: len(shown)], shown, atol=1e-6)
    again = served.client.chat.completions.create(model=served.gateway.model_id, messages=HELLO, max_tokens=2)
    assert served.gateway.groups.awaiting(again.id).prompt_id == group.prompt_id  # same prompt, same prompt_id
    assert served.client.models.list().data[0].id == served.gateway.model_id


def test_completions_route_with_logprobs(served):
    response = served.client.completions.create(
        model=served.gateway.model_id, prompt="Once upon", n=2, max_tokens=5, logprobs=2
    )
    assert response.object == "text_completion" and len(response.choices) == 2
    for choice in response.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) <= 5
        assert all(len(top) == 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0
        assert lp.text_offset == sorted(lp.text_offset) and all(x <= 0 for x in lp.token_logprobs)
    group = served.gateway.groups.awaiting(response.id)
    assert group.prompt_token_ids.tolist() == char_tokenizer().encode("Once upon")
    assert response.usage.prompt_tokens == len("Once upon") and len(group.samples) == 2


def test_streaming_sends_chunks_then_done_with_the_same_text(served):
    model = served.gateway.model_id
    stream = served.client.chat.completions.create(
        model=model, messages=HELLO, n=2, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    group = served.gateway.groups.awaiting(chunks[0].id)  # what the non-streamed answer would have said
    texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
             for i in range(2)]  # fmt: skip
    assert texts == [s.completion for s in group.samples] and all(texts)
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == [s.finish_reason for s in group.samples]
    assert chunks[-1].choices == []  # include_usage: a last chunk with the usage alone
    assert chunks[-1].usage.completion_tokens == sum(s.token_ids.size for s in group.samples)
    body = {"model": model, "prompt": "abc", "max_tokens": 3, "stream": True}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.stream("POST", f"{served.url}/completions", json=body, headers=auth) as r:
        events = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])
    assert '"object": "text_completion"' in events[0]


def test_multi_turn_conversation_is_the_prompt_and_the_assistant_turn_the_completion(served):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "now?"}]},
    ]
    response = served.client.chat.completions.create(model=served.gateway.model_id, messages=messages)
    group = served.gateway.groups.awaiting(response.id)
    flat = [{**m, "content": "And now?"} if isinstance(m["content"], list) else m for m in messages]
    assert group.prompt_token_ids.tolist() == chat_prompt_ids(char_tokenizer(), flat)
    assert group.samples[0].completion == response.choices[0].message.content


def test_stop_strings_cut_the_text_and_the_tokens(served):
    tokenizer = char_tokenizer()
    ids = np.array(tokenizer.encode("ab cd ef"), np.int32)  # decodes as "a b   c d   e f"
    made = Completion(tokenizer.decode(ids), ids, np.linspace(-1, -2, ids.size, dtype=np.float32),
                      np.zeros(0, np.float32), "length")  # fmt: skip
    cut = cut_at_stop(made, ("x", "c d", "e"), tokenizer)
    assert (cut.text, cut.finish_reason) == ("a b   ", "stop")
    assert cut.token_ids.tolist() == ids[:5].tolist() and cut.logprobs.tolist() == made.logprobs[:5].tolist()

    # the random tiny model's text is characters joined by spaces: " " stops every completion of 2+ characters
    response = served.client.chat.completions.create(
        model=served.gateway.model_id, messages=HELLO, n=4, max_tokens=12, stop=["never there", " "]
    )
    assert served.post_rewards({"id": response.id, "rewards": [0, 0, 0, 1]}).status_code == 200
    samples = served.raw_group(response.id).samples
    assert any(c.finish_reason == "stop" for c in response.choices)
    for choice, sample in zip(response.choices, samples, strict=True):
        assert " " not in choice.message.content and sample.completion == choice.message.content
        if choice.finish_reason == "stop":  # tokens through the one that completed the stop string, no more
            assert " " in tokenizer.decode(sample.token_ids) and " " not in tokenizer.decode(sample.token_ids[:-1])
            assert tokenizer.decode(sample.token_ids).startswith(choice.message.content)
        assert sample.logprobs.size == sample.token_ids.size and sample.finish_reason == choice.finish_reason


def test_rewards_per_completion_accumulate_and_may_come_late(served):
    model = served.gateway.model_id
    first = served.client.chat.completions.create(model=model, messages=HELLO, n=2)
    later = [served.client.chat.completions.create(model=model, messages=HELLO, n=2) for _ in range(2)]
    assert served.post_rewards({"id": later[0].id, "rewards": [1, 2]}).json()["status"] == "produced"
    pending = served.post_rewards({"id": first.id, "index": 1, "reward": 0.25})
    assert pending.status_code == 200 and pending.json()["status"] == "pending" and pending.json()["missing"] == [0]
    done = served.post_rewards({"id": first.id, "index": 0, "reward": -1.0})
    assert done.json()["status"] == "produced"
    assert served.post_rewards({"id": first.id, "index": 0, "reward": -1.0}).json()["status"] == "produced"  # again
    assert [s.reward for s in served.raw_group(first.id).samples] == [-1.0, 0.25]

    unknown = served.post_rewards({"id": "tba-nope", "rewards": [1, 2]})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "id"
    for body, param in (({"id": later[1].id, "rewards": [1.0, math.nan]}, "rewards"),
                        ({"id": later[1].id, "index": 0, "reward": math.inf}, "reward"),
                        ({"id": later[1].id, "rewards": [1.0]}, "rewards"),
                        ({"id": later[1].id, "index": 2, "reward": 1.0}, "index")):  # fmt: skip
        bad = served.post_rewards(body)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
    assert served.post_rewards({"id": later[1].id, "rewards": [0, 1]}).json()["status"] == "produced"


def test_concurrent_requests_share_generate_calls(served):
    stats = served.gateway.batcher.stats
    before = stats.batches, stats.requests
    start = threading.Barrier(6)
    answers = []

    def ask() -> None:
        start.wait()
        answers.append(served.client.chat.completions.create(model=served.gateway.model_id, messages=HELLO, n=2))

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({a.id for a in answers}) == 6 and all(len(a.choices) == 2 for a in answers)
    assert stats.requests - before[1] == 6
    assert stats.batches - before[0] < 6, f"{stats.batches - before[0]} generate calls for 6 requests"


def test_auth_and_malformed_requests_get_openai_style_errors(served, caplog):
    model = served.gateway.model_id
    wrong = openai.OpenAI(base_url=served.url, api_key="wrong-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.chat.completions.create(model=model, messages=HELLO)
    assert refused.value.status_code == 401
    assert refused.value.body == {"message": refused.value.body["message"], "type": "invalid_request_error",
                                  "param": None, "code": "invalid_api_key"}  # fmt: skip
    missing = httpx.post(f"{served.url}/chat/completions", json={"model": model, "messages": HELLO})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    for kwargs, param in (({"messages": HELLO, "temperature": 5}, "temperature"),
                          ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
                          ({"messages": HELLO, "top_p": 0.5}, "top_p"),
                          ({"messages": HELLO, "max_tokens": 10_000}, "max_tokens"),
                          ({"messages": HELLO, "top_logprobs": 2}, "top_logprobs")):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as bad:
            served.client.chat.completions.create(model=model, **kwargs)
        assert bad.value.body["param"] == param and bad.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        served.client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert TOKEN not in caplog.text


def test_a_published_version_reaches_the_gateway_between_batches(job):
    served, weights = job
    weights.publish(tiny_llama(5).state_dict(), step=2, version=1)
    served.gateway.batcher.subscriber.wait_for(1, 20)
    response = served.client.chat.completions.create(model=served.gateway.model_id, messages=HELLO, n=2)
    assert served.post_rewards({"id": response.id, "rewards": [0, 1]}).json()["policy_version"] == 1
    assert served.raw_group(response.id).policy_version == 1
    metrics = {m.name: m.samples for m in gateway_metrics(served.gateway)}
    assert metrics["tba_gateway_policy_version"][0].value == 1
    assert sum(s.value for s in metrics["tba_gateway_requests"] if s.labels["status"] == "401") >= 2


def test_groups_without_rewards_expire_to_the_dlq(broker):
    cfg = gateway_config(broker, reward_timeout_s=1)
    with serving(cfg, lambda: HFGenerator(tiny_llama(0), char_tokenizer(), None, 1.0, 8)) as served:
        served.ready()
        response = served.client.chat.completions.create(model=served.gateway.model_id, messages=HELLO, n=2)
        deadline = time.monotonic() + 15
        while served.gateway.groups.stats.expired == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        gone = served.post_rewards({"id": response.id, "rewards": [1, 0]})
        assert gone.status_code == 404 and "dead-letter" in gone.json()["error"]["message"]
        assert len(served.gateway.groups) == 0
        (letter,) = dead_letters(cfg)
    assert letter.reason == "no rewards within 1 s" and letter.scorer == "gateway"
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == (topic_names(cfg).raw, -1, -1)
    group = TrajectoryCodec(KafkaSchemaStore(cfg)).decode(letter.value)
    assert group.group_id == response.id and all(math.isnan(s.reward) for s in group.samples)


def test_503_while_the_policy_loads_then_a_clean_stop_dead_letters_what_awaits_rewards(broker):
    cfg = gateway_config(broker)
    loaded = threading.Event()

    def load_slowly() -> HFGenerator:
        loaded.wait(30)
        return HFGenerator(tiny_llama(0), char_tokenizer(), None, 1.0, 8)

    with serving(cfg, load_slowly) as served:
        with pytest.raises(openai.APIStatusError) as loading:
            served.client.chat.completions.create(model=served.gateway.model_id, messages=HELLO)
        assert loading.value.status_code == 503 and int(loading.value.response.headers["retry-after"]) > 0
        loaded.set()
        served.ready()
        waiting = served.client.chat.completions.create(model=served.gateway.model_id, messages=HELLO, n=2)
        done = served.client.chat.completions.create(model=served.gateway.model_id, messages=HELLO, n=2)
        assert served.post_rewards({"id": done.id, "rewards": [1, 0]}).status_code == 200
    letters = dead_letters(cfg)  # stopped: what still awaited rewards went to the dlq
    assert [(x.reason, x.scorer) for x in letters] == [("gateway stopped before rewards came", "gateway")]
    assert TrajectoryCodec(KafkaSchemaStore(cfg)).decode(letters[0].value).group_id == waiting.id
    assert served.raw_group(done.id).group_id == done.id


def test_tba_gateway_serves_until_sigterm_then_dead_letters_what_awaits_rewards(broker, tmp_path):
    cfg = gateway_config(broker)
    port, metrics_port = free_port(), free_port()
    settings = {"KAFKA__BOOTSTRAP": cfg.kafka.bootstrap, "KAFKA__NAMESPACE": cfg.kafka.namespace,
                "SEARCHER__MODEL": saved_tiny_llama(tmp_path / "model"), "SEARCHER__SEARCHERS": "0",
                "TRAINER__LORA_R": "0", "GATEWAY__ENABLED": "true", "GATEWAY__TOKEN_ENV": TOKEN_ENV,
                "WEIGHTS__PORT": str(free_port())}  # fmt: skip
    env = {**os.environ, TOKEN_ENV: TOKEN, **{f"TBA__{k}": v for k, v in settings.items()}}  # no trainer: version 0
    argv = [sys.executable, "-m", "tba.cli", "gateway", "--port", str(port), "--metrics-port", str(metrics_port)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN, max_retries=0)
    try:
        deadline = time.monotonic() + 90
        while True:  # refused while it starts, 503 while the policy loads
            try:
                response = client.chat.completions.create(model="model", messages=HELLO, n=2)
                break
            except (openai.APIConnectionError, openai.InternalServerError):
                assert time.monotonic() < deadline and proc.poll() is None, "the gateway did not come up"
                time.sleep(0.5)
        scraped = scrape(metrics_port)
        assert scraped["tba_gateway_open_groups"] == 1 and scraped["tba_gateway_batches_total"] == 1
        view = JobView(cfg)
        view.note("gateway", 0.0, scraped)
        assert "1 open, 0 expired groups" in view._throughput({"name": "gateway", "role": "gateway"})
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "gateway stopped: 0 group(s) produced, 1 sent to the dlq" in out and TOKEN not in out
    (letter,) = dead_letters(cfg)
    assert letter.reason == "gateway stopped before rewards came"
    assert TrajectoryCodec(KafkaSchemaStore(cfg)).decode(letter.value).group_id == response.id


def test_tba_run_starts_the_gateway_and_a_job_needs_something_that_generates():
    cfg = load_config(environ={}, searcher={"searchers": 0}, gateway={"enabled": True}, run={"filters": 2})
    processes = role_processes(cfg)
    assert [p.name for p in processes] == ["trainer", "filter-0", "filter-1", "gateway"]
    assert processes[-1].args == ["gateway"] and processes[-1].metrics_port == cfg.run.metrics_port + 3
    with pytest.raises(ConfigError, match="searcher.searchers: 0 with gateway.enabled false"):
        load_config(environ={}, searcher={"searchers": 0})
