"""Each role its own Kafka principal with only the rights it needs, enforced by the broker's authorizer.

kafka.principals names each role's SASL user; `tba topics create`, run by an admin (a broker super
user), grants them (kafka-python's admin client; creating an ACL that exists is a no-op):

  searcher   write raw; read prompts and policy versions
  generator  write raw (an external generator, `tba produce`)
  gateway    write raw, and dlq (groups whose rewards never came)
  filter     read raw as the filter group; write curated and dlq in transactions (ids <ns>.<group>.*)
  trainer    read curated; write policy versions and dlq (its own rejects), and raw in sync mode
  every role read and write the schemas topic: writers register their schema, readers look it up

Producers are idempotent: since Kafka 3.0 WRITE on a topic covers that (no cluster IDEMPOTENT_WRITE).
A role refused elsewhere gets one line (AccessDenied) naming its principal, the operation, the
resource and which role may.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from kafka.admin import (
    ACL,
    ACLFilter,
    ACLOperation,
    ACLPermissionType,
    ACLResourcePatternType,
    ResourcePattern,
    ResourcePatternFilter,
    ResourceType,
)
from kafka.errors import (
    AuthorizationError,
    GroupAuthorizationFailedError,
    SecurityDisabledError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailedError,
)

from ops import kafka_clients
from ops.broker import AUTHORIZER
from ops.config import TbaConfig
from ops.errors import AccessDenied, BrokerError, ConfigError, TbaError
from ops.names import filter_group, filter_instance_prefix, prompts_seed_id, searcher_group, topic_names

READ, WRITE = ACLOperation.READ, ACLOperation.WRITE  # each implies DESCRIBE


@dataclass(frozen=True)
class Right:
    operation: ACLOperation
    resource: ResourceType
    name: str
    prefixed: bool = False  # the name is a prefix (transactional ids: one per filter instance)

    def covers(self, operation: ACLOperation, resource: ResourceType, name: str) -> bool:
        named = name.startswith(self.name) if self.prefixed else name == self.name
        return (self.operation, self.resource) == (operation, resource) and named


def role_rights(cfg: TbaConfig) -> dict[str, list[Right]]:
    """What each role may do in cfg's namespace."""
    names = topic_names(cfg)  # a right names its topic, nothing more
    group = filter_group(cfg)

    def topics(operation: ACLOperation, *topic: str) -> list[Right]:
        return [Right(operation, ResourceType.TOPIC, t) for t in topic]

    schemas = topics(READ, names.schemas) + topics(WRITE, names.schemas)
    transactions = [
        Right(READ, ResourceType.GROUP, group),  # joins the group, commits offsets in its transactions
        Right(WRITE, ResourceType.TRANSACTIONAL_ID, filter_instance_prefix(cfg), prefixed=True),
    ]
    sync_history = [names.raw] if cfg.trainer.mode == "sync" else []  # the on-policy baseline's groups
    return {
        "searcher": [
            *topics(WRITE, names.raw),
            *topics(READ, names.prompts, names.policy_versions),
            Right(READ, ResourceType.GROUP, searcher_group(cfg)),  # shares the prompts with the other searchers
            # the first searcher of a job writes the task's training split to the prompts topic, in one
            # transaction of the job-wide seeding id
            *topics(WRITE, names.prompts),
            Right(WRITE, ResourceType.TRANSACTIONAL_ID, prompts_seed_id(cfg)),
            *schemas,
        ],  # fmt: skip
        "generator": topics(WRITE, names.raw) + schemas,
        "gateway": topics(WRITE, names.raw, names.dlq) + schemas,
        "filter": topics(READ, names.raw) + topics(WRITE, names.curated, names.dlq) + transactions + schemas,
        "trainer": [
            *topics(READ, names.curated),
            *topics(WRITE, names.policy_versions, names.dlq, *sync_history),
            *schemas,
        ],  # fmt: skip
    }


def role_acls(cfg: TbaConfig) -> list[ACL]:
    """The ALLOW bindings for the roles kafka.principals names."""
    rights = role_rights(cfg)
    acls = []
    for role, user in cfg.kafka.principals.items():
        for right in rights[role]:
            pattern = ACLResourcePatternType.PREFIXED if right.prefixed else ACLResourcePatternType.LITERAL
            resource = ResourcePattern(right.resource, right.name, pattern)
            acls.append(ACL(f"User:{user}", "*", right.operation, ACLPermissionType.ALLOW, resource))
    return acls


def create_role_acls(cfg: TbaConfig) -> list[str]:
    """Grant every named role its rights (needs an admin principal); returns one line per binding."""
    acls = role_acls(cfg)
    if not acls:
        return []
    if not cfg.kafka.security_protocol.startswith("SASL"):
        raise ConfigError("kafka.principals: ACLs need roles that log in (kafka.security_protocol SASL_*)")
    admin = kafka_clients.admin(cfg)
    try:
        result = admin.create_acls(acls)
        if SecurityDisabledError in result["failed"]:  # error classes, one per binding refused
            raise BrokerError(f"the Kafka brokers enforce no ACLs: set authorizer.class.name={AUTHORIZER}")
        if result["failed"]:
            raise TbaError(f"creating {len(result['failed'])} of {len(acls)} ACLs failed, first: {result['failed'][0]}")
        _wait_enforced(admin, acls, cfg.kafka.client_timeout_s)
    except AuthorizationError as exc:
        raise AccessDenied(
            f"kafka principal User:{cfg.kafka.sasl_username} may not create ACLs: run `tba topics create` "
            "as a super user of the brokers (super.users)"
        ) from exc
    finally:
        admin.close()
    return [_describe(acl) for acl in acls]


def _wait_enforced(admin, acls: list[ACL], timeout_s: float) -> None:
    """Until the broker answering describes every binding: the controller commits ACLs before brokers apply
    them, and a role started at once would be refused."""
    everything = ACLFilter(None, None, ACLOperation.ANY, ACLPermissionType.ANY,
                           ResourcePatternFilter(ResourceType.ANY, None, ACLResourcePatternType.ANY))  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while not set(acls) <= set(admin.describe_acls(everything)[0]):
        if time.monotonic() > deadline:
            raise TbaError(f"the brokers did not apply the ACLs within {timeout_s:.0f}s")
        time.sleep(0.1)


def _describe(acl: ACL) -> str:
    pattern = acl.resource_pattern
    star = "*" if pattern.pattern_type == ACLResourcePatternType.PREFIXED else ""
    return f"allowed {acl.principal} {acl.operation.name} {pattern.resource_type.name} {pattern.resource_name}{star}"


def refusal(
    cfg: TbaConfig, exc: AuthorizationError, operation: ACLOperation, transactional_id: str = ""
) -> AccessDenied:
    """One line for a refused operation: who was refused what, which role may, and what to do."""
    if isinstance(exc, GroupAuthorizationFailedError):
        resource, names = ResourceType.GROUP, [str(a) for a in exc.args] or [filter_group(cfg)]
    elif isinstance(exc, TransactionalIdAuthorizationFailedError):
        resource, names = ResourceType.TRANSACTIONAL_ID, [transactional_id or f"{filter_instance_prefix(cfg)}*"]
    else:  # kafka-python gives the topic, or a set of them
        resource = ResourceType.TOPIC
        given = exc.args[0] if exc.args else "?"
        names = sorted(given) if isinstance(given, (set, frozenset, list, tuple)) else [str(given)]
    rights = role_rights(cfg)
    allowed = [role for role in rights if any(r.covers(operation, resource, names[0]) for r in rights[role])]
    user = cfg.kafka.sasl_username
    kind = {ResourceType.TOPIC: "", ResourceType.GROUP: "group ", ResourceType.TRANSACTIONAL_ID: "transactional id "}
    head = f"kafka principal User:{user} may not {operation.name.lower()} {kind[resource]}{', '.join(names)}"
    if not allowed:
        return AccessDenied(f"{head}: no role may (only the brokers' super users)")
    who = " or ".join(f"the {role}'s" for role in allowed)
    if any(cfg.kafka.principals.get(role) == user for role in allowed):  # the right principal: no ACLs yet
        return AccessDenied(
            f"{head}: it is {who} principal, but its ACLs are missing: run `tba topics create` as an admin"
        )
    return AccessDenied(f"{head}: only {who} principal may (ACLs from `tba topics create`, kafka.principals)")


@contextmanager
def one_line_refusals(cfg: TbaConfig, operation: ACLOperation, transactional_id: str = "") -> Iterator[None]:
    """Turn the broker's refusal of operation inside into AccessDenied (one line, not a traceback)."""
    try:
        yield
    except (
        TopicAuthorizationFailedError,
        GroupAuthorizationFailedError,
        TransactionalIdAuthorizationFailedError,
    ) as exc:
        raise refusal(cfg, exc, operation, transactional_id) from exc
