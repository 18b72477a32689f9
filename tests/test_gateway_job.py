"""A job with no searcher, fed by agents through the gateway (examples/gateway_agent.py): `tba run` starts the
gateway instead of searchers, the agents' groups are completed by the filter and trained on, and new policy
versions reach the gateway."""

import pytest

from bench.gateway import server_timing
from ops.names import topic_names
from ops.topics import KafkaSchemaStore, read_topic
from schemas.records import TrajectoryCodec
from tba.live_view import scrape
from tests.gateway_job import gateway_job, run_agents
from tests.test_run import wait_until

pytestmark = pytest.mark.slow  # a whole job


def test_agents_through_the_gateway_alone_train_the_policy(tmp_path):
    with gateway_job(tmp_path) as (cfg, client):
        rounds = run_agents(client, clients=2, seconds=45)
        raw = client.chat.completions.with_raw_response.create(
            model=client.models.list().data[0].id, messages=[{"role": "user", "content": "Say some digits (1)."}]
        )
        timing = server_timing(raw.headers["server-timing"])  # what bench/gateway.py subtracts from a latency
        assert set(timing) == {"queue", "generate", "app"} and timing["app"] >= timing["generate"] > 0
        wait_until(lambda: scrape(cfg.run.metrics_port).get("tba_trainer_steps_total", 0) >= 5, 90, "five steps")
        codec = TrajectoryCodec(KafkaSchemaStore(cfg))
        curated = [codec.decode(r.value) for r in read_topic(cfg, topic_names(cfg).curated)]

    assert len(rounds) >= 10 and all(len(r["rewards"]) == 6 for r in rounds)
    assert max(r["policy_version"] for r in rounds) >= 2  # the trainer's versions reached the gateway
    ours = [g for g in curated if g.generator_id == "gateway"]
    assert len(ours) >= 10
    for g in ours:  # behaviour log-probs from the generation, reference log-probs from the filter
        assert g.prompt_token_ids.size and all(s.token_ids.size == s.logprobs.size == s.ref_logprobs.size
                                               for s in g.samples)  # fmt: skip
    log = (tmp_path / "run" / "logs").glob("*.log")
    assert not any("Traceback" in p.read_text() for p in log)
