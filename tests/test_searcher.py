"""A searcher end to end: model from disk, real math task, Kafka raw topic, weights swapped between batches."""

import numpy as np
import torch

from ops.config import with_overrides
from ops.names import topic_names
from ops.topics import JobTopics, read_topic
from policy.logprobs import token_logprobs
from producers.searcher import build_searcher
from schemas.records import TrajectoryCodec
from tests.conftest import first_batch
from tests.test_run import wait_until
from tests.tiny_models import saved_tiny_llama, tiny_llama
from trainer.weight_sync import WeightSyncServer


def test_searcher_publishes_groups_and_swaps_weights_between_batches(cfg, store, tmp_path):
    saved_tiny_llama(tmp_path / "model")
    cfg = with_overrides(
        cfg,
        weights={"port": 0, "subscription_s": 5},
        task={"train_size": 20, "eval_size": 4},
        searcher={"model": str(tmp_path / "model"), "samples_per_prompt": 3, "max_new_tokens": 8},
    )
    server = WeightSyncServer(cfg)
    port = server.start()
    cfg = with_overrides(cfg, weights={"port": port})
    searcher = build_searcher(cfg, index=1)  # the job's first searcher: it writes the training split to prompts
    prompts = JobTopics(cfg).prompts
    # committed, yet read_committed readers see them once the commit markers are written, a moment later
    wait_until(lambda: len(prompts.read()) == 20, 30, "the seeded prompts to be readable")
    seeded = {prompts.codec.decode(r.value)["prompt_id"] for r in prompts.read()}
    assert seeded == {f"basic_arithmetic-0-{i}" for i in range(20)}

    first = first_batch(searcher)
    assert {g.prompt_id for g in first} <= seeded
    assert [g.policy_version for g in first] == [0, 0]
    trained = tiny_llama(5)
    server.publish(trained.state_dict(), step=2, version=1)
    searcher.subscriber.wait_for(1, 20)
    second = searcher.step()
    assert [g.policy_version for g in second] == [1, 1] and searcher.stats.swaps == 1

    # the second batch's behaviour log-probs are the new weights' log-probs
    g = second[0]
    s = g.samples[0]
    seq = torch.tensor([g.prompt_token_ids.tolist() + s.token_ids.tolist()])
    p = len(g.prompt_token_ids)
    expected = token_logprobs(trained(seq).logits[:, p - 1 : -1], seq[:, p:], 0.7)[0].detach().numpy()
    np.testing.assert_allclose(s.logprobs, expected, atol=1e-4)

    searcher.close()
    server.stop()
    codec = TrajectoryCodec(store)
    published = [codec.decode(r.value) for r in read_topic(cfg, topic_names(cfg).raw)]
    assert sorted(x.group_id for x in published) == sorted(x.group_id for x in first + second)
    for x in published:
        assert len(x.samples) == 3 and x.generator_id == "searcher-1"
        assert all(smp.reward in (0.0, 0.1, 1.0, 1.1) for smp in x.samples)
        assert all(smp.token_ids.size == smp.logprobs.size == smp.ref_logprobs.size for smp in x.samples)


def test_tba_search_runs_without_waiting_for_a_trainer(cfg, store, tmp_path):
    """No weight-sync server is up: the searcher generates with its initial weights and says so by version 0."""
    import os
    import subprocess
    import sys

    from ops.broker import free_port

    saved_tiny_llama(tmp_path / "model")
    env = {
        **os.environ,
        "TBA__KAFKA__BOOTSTRAP": cfg.kafka.bootstrap,
        "TBA__KAFKA__NAMESPACE": cfg.kafka.namespace,
        "TBA__SEARCHER__MODEL": str(tmp_path / "model"),
        "TBA__SEARCHER__SAMPLES_PER_PROMPT": "2",
        "TBA__SEARCHER__MAX_NEW_TOKENS": "6",
        "TBA__TASK__TRAIN_SIZE": "8",
        "TBA__WEIGHTS__PORT": str(free_port()),  # nothing listens there
    }
    done = subprocess.run(
        [sys.executable, "-m", "tba.cli", "search", "--index", "0", "--batches", "2"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "searcher 0: 4 groups in 2 batches" in done.stdout
    groups = [TrajectoryCodec(store).decode(r.value) for r in read_topic(cfg, topic_names(cfg).raw)]
    assert len(groups) == 4 and {g.policy_version for g in groups} == {0}


def test_a_searcher_too_far_behind_pauses_instead_of_generating(cfg, store, tmp_path):
    from ops.broker import free_port

    saved_tiny_llama(tmp_path / "model")
    cfg = with_overrides(
        cfg,
        weights={"port": 0},
        task={"train_size": 4, "eval_size": 2},
        searcher={"model": str(tmp_path / "model"), "samples_per_prompt": 2, "max_new_tokens": 4, "max_policy_lag": 2},
    )
    announcer = WeightSyncServer(cfg)  # announces versions on Kafka; the searcher cannot reach it for weights
    announcer.start()
    searcher = build_searcher(with_overrides(cfg, searcher={"weights_target": f"127.0.0.1:{free_port()}"}), 0)
    assert len(first_batch(searcher)) == 2  # nothing announced yet: generate
    for v in range(1, 4):
        announcer.wait_published(announcer.publish(tiny_llama(v).state_dict(), step=v, version=v))
    announcer.stop()  # flushes the announcements
    assert searcher.step() == [] and searcher.stats.paused == 1  # 3 versions behind, max lag 2
    assert searcher.lagging() == 1
    searcher.close()


def test_a_reward_function_that_fails_on_one_group_skips_that_group_and_the_searcher_goes_on(cfg, store, tmp_path):
    saved_tiny_llama(tmp_path / "model")
    cfg = with_overrides(
        cfg,
        weights={"port": 0},
        task={"name": "toy", "train_size": 4, "eval_size": 2, "reward_fn": "tests.test_searcher:fails_on_prompt_0"},
        searcher={"model": str(tmp_path / "model"), "samples_per_prompt": 2, "max_new_tokens": 4,
                  "prompts_per_batch": 4},
    )  # fmt: skip
    searcher = build_searcher(cfg, 0)
    sent = first_batch(searcher)
    searcher.close()
    assert sorted(g.prompt_id for g in sent) == ["toy-0-1", "toy-0-2", "toy-0-3"]
    assert searcher.stats.unscored == 1 and searcher.stats.groups == 3
    published = [TrajectoryCodec(store).decode(r.value) for r in read_topic(cfg, topic_names(cfg).raw)]
    assert sorted(g.prompt_id for g in published) == ["toy-0-1", "toy-0-2", "toy-0-3"]
    assert all(s.reward == 0.5 for g in published for s in g.samples)


def fails_on_prompt_0(prompts, completions):
    if prompts[0].endswith("(0)."):
        raise ValueError("cannot judge this one")
    return [0.5] * len(completions)
