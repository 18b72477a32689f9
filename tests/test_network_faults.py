"""Network faults on a job spread over simulated hosts (tests/network_faults.py; namespaces made and removed
by the test, as root): the filter's host cut off from the broker, the broker frozen (SIGSTOP), the weight
service cut off from one searcher, 20 s each. Nothing acked is lost or routed twice, every role is back to
work within 30 s of each heal without a restart, and a role asked to stop during the fault stops in time."""

import pytest

from tests.netns import missing_requirements
from tests.network_faults import PROGRESS, RECOVERY_LIMIT_S, run_network_faults

pytestmark = pytest.mark.slow  # network namespaces

CASES = ["filter_cut", "broker_frozen", "weights_cut"]


def test_a_job_rides_out_a_cut_filter_a_frozen_broker_and_a_cut_weight_link(tmp_path):
    if reason := missing_requirements():
        pytest.fail(reason)
    result = run_network_faults(tmp_path, CASES, fault_s=20, stop_after_s=5, each_tally=False)
    print(result)
    for name, case in result["cases"].items():
        assert case["fault_s"] >= 20, (name, case)
        assert case["exited_by_themselves"] == [], (name, case["exited_by_themselves"])  # each came back alone
        recovery = case["recovery_s"]
        assert set(recovery) == set(PROGRESS), (name, recovery)
        assert all(s is not None and s <= RECOVERY_LIMIT_S for s in recovery.values()), (name, recovery)
        stop = case["stop"]
        assert stop["stop_s"] <= stop["limit_s"], (name, stop)
        assert stop["back_after_start_s"] is not None, (name, stop)  # started again once healed, it works
    final = result["final"]
    assert final["lost"] == 0 and sum(final["acked"].values()) > 0, final
    assert final["acked"] == final["raw_by_searcher"], final  # the searchers stopped cleanly at the end
    assert final["duplicated"] == 0, final  # none twice in raw, none routed twice
    assert final["not_routed"] == 0 and final["routed_not_in_raw"] == 0, final
