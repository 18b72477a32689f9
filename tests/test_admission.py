"""No record can kill the trainer: groups it cannot train on are sent to the dlq with the reason while
a running job keeps training; a group without prompt token ids is tokenized from its prompt text."""

import threading

import numpy as np

from ops import kafka_clients
from ops.broker import free_port
from ops.names import topic_names
from ops.topics import JobTopics, read_topic
from ops.trajectory_producer import TrajectoryProducer
from producers.synthetic import synthetic_group
from schemas.records import DeadLetterCodec
from tba.live_view import scrape
from tests.conftest import trainer_on_tiny_model
from tests.test_run import wait_until
from trainer.job import run_trainer


def untrainable(rng) -> dict[str, tuple]:
    """Groups the tiny model (vocabulary 128, context 512) cannot train on, and what the dlq must say."""
    made = {}
    g = synthetic_group(rng, 100, samples=4, tokens=10, vocab=128)
    g.prompt, g.prompt_token_ids = "", g.prompt_token_ids[:0]
    made["no prompt"] = (g, "no prompt_token_ids and no prompt text to tokenize")
    g = synthetic_group(rng, 101, samples=4, tokens=10, vocab=128)
    g.samples[1].token_ids[0] = 5000
    made["vocabulary"] = (g, "sample 1: token id 5000 is outside the model's vocabulary of 128")
    g = synthetic_group(rng, 102, samples=4, tokens=10, vocab=128)
    g.model_id = "another-model"
    made["model"] = (g, "made with model 'another-model'; this job trains 'model' (another tokenizer)")
    g = synthetic_group(rng, 103, samples=4, tokens=10, vocab=128)
    g.prompt_token_ids = rng.integers(0, 128, 600, dtype=np.int32)
    made["context"] = (g, "prompt + completion is 6")  # 600 + the longest completion
    return made


def test_a_running_job_keeps_training_past_groups_it_cannot_train_on(cfg, store, tmp_path):
    port = free_port()
    cfg = trainer_on_tiny_model(cfg, tmp_path)
    names = topic_names(cfg)
    rng = np.random.default_rng(0)
    with TrajectoryProducer(cfg, topic=JobTopics(cfg, store).curated) as curated:
        for i in range(4):
            curated.send(synthetic_group(rng, i, samples=4, tokens=10, vocab=128))
    stop = threading.Event()
    job = threading.Thread(target=run_trainer, args=(cfg, stop), kwargs={"metrics_port": port}, daemon=True)
    job.start()
    try:
        wait_until(lambda: scrape(port).get("tba_trainer_steps_total", 0) >= 2, 120, "two steps on good groups")

        bad = untrainable(rng)
        ids_missing = synthetic_group(rng, 104, samples=4, tokens=10, vocab=128)
        ids_missing.prompt, ids_missing.prompt_token_ids = "What is 2 + 2?", ids_missing.prompt_token_ids[:0]
        with TrajectoryProducer(cfg, topic=JobTopics(cfg, store).curated) as curated:
            for group, _ in bad.values():
                curated.send(group)
            curated.send(ids_missing)  # trainable: the prompt text is tokenized as searchers do
        raw = kafka_clients.producer(cfg)
        raw.send(names.curated, key=b"junk", value=b"\x00not avro at all")
        raw.flush()
        raw.close()

        wait_until(lambda: scrape(port).get("tba_trainer_rejected_groups_total", 0) >= 5, 60, "five rejections")
        steps = scrape(port)["tba_trainer_steps_total"]
        wait_until(lambda: scrape(port).get("tba_trainer_steps_total", 0) >= steps + 3, 120, "three more steps")
        assert scrape(port)["tba_trainer_buffer_groups"] == 5  # the 4 good groups and the one tokenized
        assert scrape(port)["tba_trainer_rejected_groups_total"] == 5
    finally:
        stop.set()
        job.join(120)
    assert not job.is_alive()

    letters = [DeadLetterCodec(store).decode(r.value) for r in read_topic(cfg, names.dlq)]
    assert {x.scorer for x in letters} == {"trainer"} and len(letters) == 5
    reasons = [x.reason for x in letters]
    for _, says in bad.values():
        assert sum(says in r for r in reasons) == 1, (says, reasons)
    assert sum(r.startswith("undecodable:") for r in reasons) == 1
    assert all(x.source_topic == names.curated for x in letters)
    assert {x.value for x in letters} >= {b"\x00not avro at all"}
