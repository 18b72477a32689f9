"""`tba run`: the whole job supervised: metrics endpoints, a crashed searcher restarted, an ordered
stop with a checkpoint, a resume, and `tba report` on what the run left behind."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from ops.broker import free_port
from ops.config import load_config, with_overrides
from ops.metrics import metric_rows
from tba.live_view import JobView, scrape
from tba.profiling import PROFILE_DIR_ENV, time_split
from tba.stalls import StallWatch, filter_member_lag
from tba.supervisor import Supervisor
from tests.tiny_models import saved_tiny_llama


def wait_until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def job_state(run_dir):
    try:
        return json.loads((run_dir / "job.json").read_text())
    except (OSError, ValueError):
        return None


def process(state, name):
    return next(p for p in state["processes"] if p["name"] == name)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_tba_run_supervises_restarts_stops_in_order_resumes_and_reports(cfg, tmp_path):
    saved_tiny_llama(tmp_path / "model")
    run_dir = tmp_path / "run"
    metrics_port = free_port()
    cfg = with_overrides(
        cfg,
        task={"name": "toy", "train_size": 16, "eval_size": 4},
        searcher={"model": str(tmp_path / "model"), "samples_per_prompt": 4, "prompts_per_batch": 2,
                  "max_new_tokens": 6, "temperature": 1.0},
        filter={"scorers": ["structure", "finite_rewards", "lengths"]},
        buffer={"samples_per_prompt": 4},
        trainer={"prompts_per_step": 2, "lr": 1e-3, "warmup_steps": 1, "sync_every": 1, "min_buffer_prompts": 2,
                 "max_steps": 100_000, "eval_every": 5, "checkpoint_every": 1000, "run_dir": str(run_dir),
                 "eval_prompts": 4, "eval_max_new_tokens": 6},
        weights={"port": 0, "subscription_s": 10},
        run={"metrics_port": metrics_port, "restart_initial_s": 0.5, "stall_s": 20},
    )  # fmt: skip
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    tba = [sys.executable, "-m", "tba.cli"]
    profiles = tmp_path / "profiles"  # every role profiled, as bench/time_split.py profiles the default job
    job = subprocess.Popen([*tba, "run", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, PROFILE_DIR_ENV: str(profiles)})  # fmt: skip
    try:
        # every role serves its metrics; the trainer trains on what the searcher made and the filter passed
        wait_until(lambda: scrape(metrics_port).get("tba_trainer_steps_total", 0) >= 3, 240, "three trainer steps")
        trainer = scrape(metrics_port)
        assert trainer["tba_trainer_buffer_groups"] >= 2
        assert scrape(metrics_port + 1)["tba_searcher_groups_total"] >= 2
        assert scrape(metrics_port + 2)["tba_filter_accepted_total"] >= 2

        # a searcher killed as by a crash comes back, with a back-off
        searcher = process(job_state(run_dir), "searcher-0")
        os.kill(searcher["pid"], signal.SIGKILL)
        restarted = wait_until(
            lambda: (s := job_state(run_dir)) and process(s, "searcher-0")["restarts"] == 1
            and process(s, "searcher-0")["pid"] not in (None, searcher["pid"]) and s,
            60, "the searcher's restart",
        )  # fmt: skip
        assert process(restarted, "searcher-0")["exit_codes"] == [-signal.SIGKILL]

        # a filter stuck whole (stopped, as a deadlock would leave it) answers nothing: killed and restarted
        job_cfg = with_overrides(cfg, kafka={"namespace": restarted["namespace"]})
        assert set(filter_member_lag(job_cfg)) == {"0"}  # the filter group's one member, by its instance
        stuck = process(restarted, "filter-0")
        os.kill(stuck["pid"], signal.SIGSTOP)
        restarted = wait_until(
            lambda: (s := job_state(run_dir)) and process(s, "filter-0")["stall_restarts"] == 1
            and process(s, "filter-0")["pid"] not in (None, stuck["pid"]) and s,
            90, "the stuck filter's restart",
        )  # fmt: skip
        assert all(p["stall_restarts"] == 0 for p in restarted["processes"] if p["name"] != "filter-0")
        wait_until(lambda: scrape(metrics_port + 2).get("tba_filter_accepted_total", 0) >= 1, 90, "the filter back")
        pids = [p["pid"] for p in restarted["processes"]]

        job.send_signal(signal.SIGTERM)  # the trainer checkpoints, then everything stops
        output, _ = job.communicate(timeout=180)
    finally:
        if job.poll() is None:
            job.kill()  # as a crash would: its processes must not outlive it
            job.wait()
            wait_until(lambda: not any(alive(p["pid"]) for p in job_state(run_dir)["processes"] if p["pid"]),
                       60, "the processes of a killed supervisor to stop")  # fmt: skip
    assert job.returncode == 0, output
    assert "processes" in output and "job stopped after" in output  # the view as text (no terminal), then the end
    assert not any(alive(pid) for pid in pids)
    rows = metric_rows(run_dir)
    last_step = max(r["step"] for r in rows)
    assert last_step >= 3 and (run_dir / "inspect.json").exists()
    assert not any(r.get("at_stop") for r in rows)  # stopped by a signal: no evaluation after it
    # each role stopped in order left its profile (the killed ones did not): where its time went, phase by phase
    assert {path.name for path in profiles.glob("*.pstats")} >= {f"tba-{pid}.pstats" for pid in pids}
    splits = {s["role"]: s for s in (time_split(profiles / f"tba-{pid}.pstats") for pid in pids)}
    trained = splits["trainer"]["phases"]
    assert trained["step"]["calls"] == last_step and trained["backward"]["calls"] >= last_step
    assert trained["optimizer"]["calls"] == last_step and trained["log_softmax"]["calls"] >= last_step
    assert 0 < trained["forward"]["seconds"] < trained["step"]["seconds"] < splits["trainer"]["seconds"]
    assert trained["evaluation"]["calls"] == 1 + last_step // 5  # at step 0 and every eval_every
    searched = splits["searcher"]["phases"]
    generated = searched["generation"]["calls"]  # a batch of 2 prompts: one generation, then each group scored
    assert 1 <= generated <= searched["reward"]["calls"] == searched["kafka_send"]["calls"] <= 2 * generated
    assert 0 < searched["generation"]["seconds"] < searched["batch"]["seconds"]
    # run again: the job resumes from the checkpoint and ends by itself at max_steps, a step the trainer does not
    # evaluate at (eval_every), so `tba run` evaluates the policy it stopped with. It runs from the job's own
    # directory with run_dir relative to it, as the default .tba/run is: every role must find the same run dir
    again_cfg = with_overrides(cfg, trainer={"max_steps": last_step + 2, "eval_every": 1000, "run_dir": "run"})
    config.write_text(yaml.safe_dump(again_cfg.model_dump(mode="json")))
    again = subprocess.run([*tba, "run", str(config)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    rows = metric_rows(run_dir)
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps[-2:] == [last_step + 1, last_step + 2]
    stopped_with = [r for r in rows if r["kind"] == "eval"][-1]
    assert stopped_with["at_stop"] and stopped_with["step"] == last_step + 2 and rows[-1] is stopped_with
    assert stopped_with["eval_problems"] == 4 and 0 <= stopped_with["greedy_accuracy"] <= 1
    assert process(job_state(run_dir), "trainer")["status"] == "finished"
    assert {p["status"] for p in job_state(run_dir)["processes"] if p["role"] != "trainer"} == {"stopped"}

    report = subprocess.run([*tba, "report", str(run_dir)], capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    summary = (run_dir / "report" / "report.md").read_text()
    assert f"steps: {last_step + 2}" in summary
    assert f"greedy accuracy (step 0 -> {last_step + 2}, the policy the job stopped with, 4 problems)" in summary
    assert "the noise (two standard errors)" in summary and "held-out sampled reward: " in summary
    assert "prompts trained per group received" in summary  # the replay ratio, bounded by buffer.max_replay_ratio:
    assert all(r["replay_ratio"] <= cfg.buffer.max_replay_ratio for r in rows if r["kind"] == "train")
    for figure in ("learning", "throughput", "staleness"):
        assert (run_dir / "report" / f"{figure}.png").stat().st_size > 10_000


def test_a_stopped_process_is_not_restarted_even_while_it_waits_out_a_back_off(cfg, tmp_path):
    cfg = with_overrides(cfg, trainer={"run_dir": str(tmp_path)}, run={"restart_initial_s": 60})
    supervisor = Supervisor(cfg)
    searcher = next(p for p in supervisor.processes if p.role == "searcher")
    for p in supervisor.processes:
        p.done = "" if p is searcher else "stopped"  # only the searcher is supervised here
    searcher.proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])  # as a crash
    searcher.proc.wait()
    supervisor.tick()
    assert searcher.proc is None and searcher.exit_codes == [3] and searcher.next_start > time.monotonic()

    supervisor.terminate([searcher], 1)  # e.g. the job stops while the searcher waits to come back
    searcher.next_start = 0.0  # its back-off is over
    supervisor.tick()
    assert searcher.proc is None and process(supervisor.state(), searcher.name)["status"] == "stopped"


def test_a_stop_notes_the_exit_of_a_process_that_ended_since_the_last_tick(cfg, tmp_path):
    supervisor = Supervisor(with_overrides(cfg, trainer={"run_dir": str(tmp_path)}))
    searcher = next(p for p in supervisor.processes if p.role == "searcher")
    searcher.proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])  # Kafka gone: it gave up
    searcher.proc.wait()
    supervisor.terminate(supervisor.processes, 1)  # no tick between its exit and the stop
    supervisor.terminate(supervisor.processes, 1)  # and a second stop notes nothing twice
    assert searcher.exit_codes == [3] and process(supervisor.state(), searcher.name)["status"] == "stopped"


def test_metric_rows_leave_out_a_last_line_cut_short_by_a_kill(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n{"kind": "eval", "step": 1}\n{"kind": "tr')
    assert [r["kind"] for r in metric_rows(tmp_path)] == ["train", "eval"]
    assert metric_rows(tmp_path / "absent") == []


def test_the_live_view_shows_throughput_over_the_last_minute_and_a_restart_as_no_drop_below_zero():
    view = JobView(load_config(environ={}))
    trainer = {"name": "trainer", "role": "trainer"}
    shown = []
    for second in range(120):  # a step every 8 s, the view called every second (as the supervisor calls it)
        view.note("trainer", float(second), {"tba_trainer_steps_total": float(second // 8)})
        shown.append(view._throughput(trainer))
    # over a minute 7 or 8 steps; over the last second, as it was, "0.0 steps/min" 7 times in 8
    assert set(shown[60:]) == {"7.0 steps/min", "8.0 steps/min"}
    view.note("trainer", 120.0, {})  # not answering for a moment: no sample
    assert view._throughput(trainer) == shown[-1]
    view.note("trainer", 121.0, {"tba_trainer_steps_total": 0.0})  # restarted: counting from 0 again
    assert view._throughput(trainer) == "0.0 steps/min"
    view.note("trainer", 129.0, {"tba_trainer_steps_total": 1.0})
    assert view._throughput(trainer) == "7.5 steps/min"
    # a filter restarted behind a backlog passes its old count before the first scrape: its start time tells
    view.note("filter", 0.0, {"tba_filter_consumed_total": 100.0}, started_at=0.0)
    view.note("filter", 10.0, {"tba_filter_consumed_total": 500.0}, started_at=5.0)
    view.note("filter", 11.0, {"tba_filter_consumed_total": 520.0}, started_at=5.0)
    assert view._throughput({"name": "filter", "role": "filter"}) == "20.0 records/s"


def test_the_live_view_reads_a_port_that_is_not_prometheus_as_no_metrics():
    import http.server
    import threading

    class NotMetrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{ this is no exposition format")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotMetrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert scrape(server.server_address[1]) == {}
        assert scrape(free_port()) == {}  # nothing listening yet
    finally:
        server.shutdown()


def test_a_run_dir_resumes_only_the_job_whose_checkpoint_it_holds(cfg, tmp_path):
    from ops.errors import TbaError

    cfg = with_overrides(cfg, trainer={"run_dir": str(tmp_path)})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step-000010")
    # what may change between runs of one job: its budget, its length, how many processes, ports
    Supervisor(with_overrides(cfg, run={"budget_s": 60}, trainer={"max_steps": 99}, weights={"port": 0})).check_resume()
    other = with_overrides(cfg, trainer={"lr": 1e-5}, task={"dataset": "chain_sum"})
    with pytest.raises(TbaError, match=r"other settings \(task.dataset: '\w+' -> 'chain_sum'; trainer.lr: "):
        Supervisor(other).check_resume()


def test_a_role_is_stalled_only_without_progress_while_it_had_work():
    watch = StallWatch(stall_s=60)
    watch.started("trainer", now=0)
    full = {"tba_trainer_steps_total": 7, "tba_trainer_ready": 1}
    assert watch.look("trainer", "trainer", full, now=10) is None
    assert watch.look("trainer", "trainer", full, now=69) is None  # not yet stall_s without a step
    assert watch.look("trainer", "trainer", full, now=71) == "no step with a buffer to train on for 61s"
    waiting = {"tba_trainer_steps_total": 7, "tba_trainer_ready": 0}  # too few prompts or new groups: rightly idle
    assert watch.look("trainer", "trainer", waiting, now=200) is None
    assert watch.look("trainer", "trainer", full, now=250) is None  # the clock started again when idle

    watch.started("filter-0", now=0)
    routed = {"tba_filter_consumed_total": 5, "tba_filter_transactions_total": 2}
    assert watch.look("filter-0", "filter", routed, lag=0, now=100) is None  # nothing waiting on its partitions
    assert watch.look("filter-0", "filter", routed, lag=30, now=150) is None  # counted from the last idle look
    assert watch.look("filter-0", "filter", routed, lag=30, now=161) == (
        "nothing routed with 30 records waiting on its partitions for 61s"
    )

    watch.started("searcher-0", now=0)
    watch.started("searcher-1", now=0)
    assert watch.look("searcher-1", "searcher", {}, now=170) is None  # loading its model: 3 x stall_s to answer
    assert watch.look("searcher-1", "searcher", {}, now=181) == "its metrics endpoint has not answered for 181s"
    assert watch.look("searcher-0", "searcher", {"tba_searcher_idle_steps_total": 1}, now=30) is None
    assert watch.look("searcher-0", "searcher", {"tba_searcher_idle_steps_total": 2}, now=80) is None  # looking
    assert watch.look("searcher-0", "searcher", {}, now=139) is None  # its endpoint quiet, not yet stall_s
    assert watch.look("searcher-0", "searcher", {}, now=141) == "its metrics endpoint has not answered for 61s"
    assert watch.look("gateway", "gateway", {"tba_gateway_open_groups": 0}, now=1000) is None  # idle is fine
