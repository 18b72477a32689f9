"""Every name a job gives Kafka: its topics (namespaced), its consumer groups and its transactional ids."""

from __future__ import annotations

from dataclasses import dataclass

from ops.config import TbaConfig
from ops.errors import ConfigError


@dataclass(frozen=True)
class TopicNames:
    raw: str
    curated: str
    dlq: str
    schemas: str
    policy_versions: str
    prompts: str


def topic_names(cfg: TbaConfig) -> TopicNames:
    """The namespaced names alone (JobTopics holds the topics themselves)."""
    ns = cfg.kafka.namespace
    if ns is None:  # ops.job.for_job resolves it; reaching here without it is a bug of the caller
        raise ConfigError("kafka.namespace: no job namespace resolved (ops.job.for_job)")
    return TopicNames(
        raw=f"{ns}.trajectories.raw",
        curated=f"{ns}.trajectories.curated",
        dlq=f"{ns}.trajectories.dlq",
        schemas=f"{ns}.schemas",
        policy_versions=f"{ns}.policy.versions",
        prompts=f"{ns}.prompts",
    )


# -- consumer groups and transactional ids: every one a job uses is named here ---------------------------------


def filter_group(cfg: TbaConfig) -> str:
    """The filter instances' consumer group."""
    return f"{cfg.kafka.namespace}.{cfg.filter.group}"


def filter_instance_id(cfg: TbaConfig, instance: str) -> str:
    """A filter instance's static group membership and its transactional id alike: a restarted instance both
    takes its partitions straight back and fences its dead predecessor."""
    return f"{filter_instance_prefix(cfg)}{instance}"


def filter_instance_prefix(cfg: TbaConfig) -> str:
    """What every filter instance's transactional id starts with (its ACL is granted on this prefix)."""
    return f"{filter_group(cfg)}."


def searcher_group(cfg: TbaConfig) -> str:
    """The searchers' consumer group over the prompts topic."""
    return f"{cfg.kafka.namespace}.searchers"


def searcher_client_id(cfg: TbaConfig, member: str) -> str:
    return f"{searcher_group(cfg)}.{member}"


def prompts_seed_id(cfg: TbaConfig) -> str:
    """The one transactional id every searcher seeds the prompts topic with (so it gets one copy)."""
    return f"{topic_names(cfg).prompts}.seed"


def redrive_group(cfg: TbaConfig, scorer: str) -> str:
    """The consumer group whose committed dlq offset says how far `scorer`'s dead letters were re-driven."""
    return f"{cfg.kafka.namespace}.redrive.{scorer}"
