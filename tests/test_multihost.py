"""Every role on its own host (network namespaces made and removed by the test): SASL to Kafka, TLS and
tokens on weight sync, the trainer data-parallel over two hosts; one searcher host dies, the rest go on."""

import pytest

from tests.multihost import run_multihost
from tests.netns import missing_requirements

pytestmark = pytest.mark.slow  # network namespaces


def test_a_job_spread_over_six_hosts_survives_losing_a_searcher_host(tmp_path):
    if reason := missing_requirements():
        pytest.fail(reason)
    result = run_multihost(tmp_path)
    assert result["steps"] >= 10
    # stopped with SIGTERM to torchrun on each trainer host (its agent then exits 1 whatever its workers did):
    # both workers checkpointed and stopped at the same step, so both hosts took every step
    stopped = result["trainer_stopped_at"]
    assert stopped[0] is not None and stopped[0] == stopped[1] == result["steps"], result
    for name, searcher in result["searchers"].items():
        assert searcher["versions"] >= 2, (name, searcher)  # through gRPC, bytes counted on the wire
        assert searcher["wire_bytes"] > 0 and searcher["shared_memory"] == 0, (name, searcher)
    # searcher-0 generated with a version it received (searcher-1 may be killed before its next batch does)
    assert result["newest_version_by_searcher"]["searcher-0"] >= 1, result
    assert result["lost"] == 0, result
    assert result["acked"]["searcher-0"] == result["raw_by_searcher"]["searcher-0"], result  # stopped cleanly
    assert result["duplicates_in_raw"] == 0 and result["routed_twice"] == 0, result
    assert result["not_routed"] == 0 and result["routed_not_in_raw"] == 0, result
    # after searcher-1's host died: the trainer stepped on, searcher-0 sent groups and received versions
    assert result["steps"] >= result["steps_at_kill"] + 3, result
    assert result["searcher_0_groups_after_kill"] > 0 and result["searcher_0_versions_after_kill"] > 0, result
    assert result["searcher_0_exit"] == 0, result


def test_shared_memory_is_offered_only_where_the_files_are(tmp_path):
    """host_id (when the weight service maps versions instead of sending them): another network namespace
    alone still opens the same /dev/shm files, so it is the same host; a simulated host has its own."""
    import os
    import subprocess
    import sys

    from ops.shared_memory import host_id
    from tests.multihost import ROOT
    from tests.netns import Hosts

    if reason := missing_requirements():
        pytest.fail(reason)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)}
    ask = [sys.executable, "-c", "from ops.shared_memory import host_id; print(host_id())"]
    with Hosts(["other"]) as hosts:
        elsewhere = hosts.run("other", ask, env, 60)
        netns_only = subprocess.run(["ip", "netns", "exec", hosts.netns["other"], *ask], env=env, capture_output=True,
                                    text=True, timeout=60)  # fmt: skip
    assert elsewhere.returncode == 0 and netns_only.returncode == 0, elsewhere.stderr + netns_only.stderr
    assert netns_only.stdout.strip() == host_id()
    assert elsewhere.stdout.strip() not in ("", host_id())
