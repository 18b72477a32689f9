"""Bad input loses nothing and stops nothing: every malformed message ends in the dlq with a reason."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.filter import GroupFilter
from ops.topics import JobTopics
from producers.synthetic import synthetic_group
from schemas.records import TrajectoryCodec
from tests.malformed import KINDS, Malformed, fuzz


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096), cut=st.integers(0, 10_000), flips=st.lists(st.integers(0, 10_000), max_size=8))
def test_the_filter_routes_any_bytes_without_raising(cfg, store, data, cut, flips):
    route = GroupFilter(cfg, JobTopics(cfg, store)).route
    out = route(data)  # arbitrary bytes
    assert not out.accepted and out.scorer == "decode"
    valid = bytearray(TrajectoryCodec(store).encode(synthetic_group(np.random.default_rng(cut), cut, samples=2)))
    for i in flips:  # a valid message with bytes flipped may still decode: it must be routed either way
        valid[i % len(valid)] ^= 0xFF
    route(bytes(valid))
    route(bytes(valid[: cut % len(valid)]))


def test_every_kind_of_malformed_message_is_rejected_by_the_filter(cfg, store, rng):
    route, makers = GroupFilter(cfg, JobTopics(cfg, store)).route, Malformed(store, cfg.filter.max_completion_tokens)
    for kind in KINDS:
        out = route(makers.make(kind, rng, 7))
        assert not out.accepted, kind


def test_ten_thousand_malformed_messages_among_valid_ones_through_kafka_and_a_filter_process(cfg):
    result = fuzz(cfg, malformed=10_000, valid=1_000, seed=1)
    print({k: v for k, v in result.items() if k != "filter_stderr_tail"})
    assert result["crashes"] == 0, result["filter_stderr_tail"]
    assert result["in_dlq"] == result["fuzzed"] == 10_000
    assert result["valid_in_curated"] == result["valid"] == 1_000
    assert result["malformed_in_curated"] == result["valid_in_dlq"] == result["duplicates"] == 0
    assert set(result["kinds"]) == set(KINDS)
