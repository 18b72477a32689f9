import re

import pytest

from ops.config import load_config
from ops.errors import ConfigError


def test_defaults_load_without_a_file():
    cfg = load_config(environ={})
    assert cfg.kafka.namespace is None  # each job gets its own (ops.job)
    assert cfg.filter.scorers[0] == "structure"


def test_unknown_field_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("kafka:\n  bootstrapp: x:9092\n")
    with pytest.raises(ConfigError, match=r"kafka\.bootstrapp: unknown field"):
        load_config(path, environ={})


def test_wrong_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"topics\.compression: Input should be 'zstd', 'lz4' or 'none'.*'gzip'"):
        load_config(environ={}, topics={"compression": "gzip"})


def test_unknown_scorer_is_rejected_with_the_valid_names():
    with pytest.raises(ConfigError, match=r"filter\.scorers\.1: Input should be 'structure'.*'safety'"):
        load_config(environ={}, filter={"scorers": ["structure", "sentiment"]})


def test_environment_overrides_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("kafka:\n  namespace: fromfile\ntopics:\n  partitions: 2\n")
    cfg = load_config(path, environ={"TBA__KAFKA__NAMESPACE": "fromenv", "TBA__BUFFER__ON_POLICY_PROB": "0.5"})
    assert cfg.kafka.namespace == "fromenv"
    assert cfg.topics.partitions == 2
    assert cfg.buffer.on_policy_prob == 0.5


def test_the_shipped_default_config_is_the_embedded_defaults():
    from pathlib import Path

    shipped = load_config(Path(__file__).parents[1] / "configs" / "default.yaml", environ={})
    assert shipped == load_config(environ={})


def test_each_paper_setting_config_loads_and_names_what_to_fill_in():
    from pathlib import Path

    from policy.tasks import build_task

    configs = Path(__file__).parents[1] / "configs"
    math = load_config(configs / "math.yaml", environ={})
    assert math.buffer.samples_per_prompt == 20 and math.searcher.samples_per_prompt == 24
    assert build_task(math.task).train[0].answer  # real GSM-style problems with answers
    for name, field in (("preference", "task.prompts_file"), ("redteam", "task.prompts_file")):
        cfg = load_config(configs / f"{name}.yaml", environ={})
        assert cfg.task.name == name
        with pytest.raises(ConfigError, match=field):
            build_task(cfg.task)  # the shipped paths are placeholders: the error says which field to fill in


def test_the_configs_that_run_anywhere_build_their_tasks_from_what_ships():
    from pathlib import Path

    from policy.tasks import build_task

    root = Path(__file__).parents[1]
    for name, task_name in (("sentiment", "preference"), ("redteam_embedded", "redteam")):
        cfg = load_config(root / "configs" / f"{name}.yaml", environ={})
        task = build_task(cfg.task.model_copy(update={"prompts_file": root / cfg.task.prompts_file}))
        assert cfg.task.name == task_name and len(task.train) >= 150 and len(task.held_out) >= 32
        assert task.reward_fn is not None


def test_a_job_gets_a_namespace_of_its_own_kept_in_its_run_dir(tmp_path):
    from ops.job import for_job

    cfg = load_config(environ={}, trainer={"run_dir": str(tmp_path / "my run")})
    with pytest.raises(ConfigError, match=r"kafka.namespace: not set, and trainer.run_dir .* holds no job yet"):
        for_job(cfg)
    first = for_job(cfg, create=True).kafka.namespace
    assert re.fullmatch(r"tba-my-run-[0-9a-f]{8}", first)
    assert for_job(cfg).kafka.namespace == for_job(cfg, create=True).kafka.namespace == first  # kept
    other = load_config(environ={}, trainer={"run_dir": str(tmp_path / "other" / "my run")})
    assert for_job(other, create=True).kafka.namespace not in (first, None)  # same name, another job
    named = load_config(environ={}, kafka={"namespace": "mine"}, trainer={"run_dir": str(tmp_path / "named")})
    assert for_job(named, create=True).kafka.namespace == "mine" and not (tmp_path / "named").exists()


def test_environment_values_of_text_fields_are_taken_as_written_and_others_as_yaml():
    cfg = load_config(
        environ={
            "TBA__KAFKA__NAMESPACE": "2024",
            "TBA__TOPICS__COMPRESSION": "none",
            "TBA__TOPICS__PARTITIONS": "6",
            "TBA__FILTER__SCORERS": "[structure, lengths]",
            "TBA__SEARCHER__MAX_MODEL_LEN": "null",
            "TBA__TASK__DATASET_ARGS__MAX_TERMS": "3",
        }
    )
    assert cfg.kafka.namespace == "2024" and cfg.topics.compression == "none" and cfg.topics.partitions == 6
    assert cfg.filter.scorers == ["structure", "lengths"] and cfg.searcher.max_model_len is None
    assert cfg.task.dataset_args["max_terms"] == 3


def test_a_bad_environment_value_or_key_names_its_variable():
    with pytest.raises(ConfigError, match=r"kafka\.bootstrapp: unknown field \(from the environment variable "
                       r"TBA__KAFKA__BOOTSTRAPP\)"):  # fmt: skip
        load_config(environ={"TBA__KAFKA__BOOTSTRAPP": "x:9092"})
    with pytest.raises(ConfigError, match=r"kafk: unknown field \(from the environment variable TBA__KAFK__X\)"):
        load_config(environ={"TBA__KAFK__X": "1"})
    with pytest.raises(ConfigError, match=r"topics\.partitions: .* \(from the environment variable "
                       r"TBA__TOPICS__PARTITIONS\)"):  # fmt: skip
        load_config(environ={"TBA__TOPICS__PARTITIONS": "many"})
