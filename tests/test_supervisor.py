"""`tba run`'s supervisor around its processes: the broker it starts and stops, Ctrl-C while it prepares,
one job per run dir, job.json from the first moment, the live view's word for a loading coordinator."""

import json
import subprocess
import sys
import threading
import time
import uuid

import pytest
import yaml

from ops.broker import LocalBroker, free_port
from ops.config import load_config, with_overrides
from ops.errors import TbaError
from tba.live_view import JobView
from tba.signals import Stop
from tba.supervisor import Supervisor, run_job


def local_job(tmp_path, **run):
    """A job whose kafka.bootstrap is a local broker of its own (not started yet); no process is launched."""
    port = free_port()
    return load_config(
        environ={},
        kafka={"bootstrap": f"127.0.0.1:{port}", "namespace": f"t{uuid.uuid4().hex[:10]}", "client_timeout_s": 20},
        broker={"port": port, "data_dir": str(tmp_path / "kafka"), "heap": "256m"},
        searcher={"model": str(tmp_path / "model")},  # never loaded: named so no default model is prepared
        trainer={"model": str(tmp_path / "model"), "run_dir": str(tmp_path / "run")},
        weights={"port": 0},
        run={"metrics_port": 0, **run},
    )


@pytest.mark.slow  # a broker of its own
def test_ctrl_c_while_the_broker_starts_stops_the_job_at_once_and_the_broker_it_started(tmp_path):
    cfg = local_job(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "job.json").write_text('{"failed": "the previous run"}')
    stop, pressed = Stop(), []

    def ctrl_c_once_the_broker_is_launched() -> None:
        while not (tmp_path / "kafka" / "node.json").exists():
            time.sleep(0.05)
        pressed.append(time.monotonic())
        stop.set()

    threading.Thread(target=ctrl_c_once_the_broker_is_launched, daemon=True).start()
    state = run_job(cfg, stop)
    assert time.monotonic() - pressed[0] < 35  # the broker's stop, not its start and the job's processes
    assert all(p["pid"] is None and p["exit_codes"] == [] for p in state["processes"])  # none was launched
    assert state["stage"] == "stopped" and "failed" not in state
    assert json.loads((tmp_path / "run" / "job.json").read_text()) | {"elapsed_s": 0} == state | {"elapsed_s": 0}
    assert LocalBroker(tmp_path / "kafka", cfg.broker.port).status() is None


def test_a_broker_running_before_the_job_stays_and_keep_broker_keeps_one_it_started(broker, tmp_path):
    found = with_overrides(local_job(tmp_path / "a"), kafka={"bootstrap": broker.bootstrap},
                           broker={"port": broker.port, "data_dir": str(broker.data_dir)})  # fmt: skip
    supervisor = Supervisor(found)
    assert supervisor.prepare() and not supervisor.started_broker
    supervisor.release_servers()
    assert broker.status() is not None

    supervisor = Supervisor(local_job(tmp_path / "b", keep_broker=True))
    assert supervisor.prepare() and supervisor.started_broker
    try:
        # a new broker's group coordinator is still loading its offsets: said in words, not as an exception
        lag = JobView(supervisor.cfg)._read_kafka()["filter_lag"]
        assert lag == "waiting for the filter group's coordinator"
        supervisor.release_servers()
        assert supervisor.broker.status() is not None
    finally:
        supervisor.broker.stop()


def test_one_job_at_a_time_holds_a_run_dir_and_a_failed_prepare_says_why_in_job_json(cfg, tmp_path):
    cfg = with_overrides(cfg, trainer={"run_dir": str(tmp_path)}, weights={"port": 0})
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ops.job import locked_run_dir\n"
         "with locked_run_dir(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TbaError, match=rf"run dir {tmp_path} is in use by another `tba run` \(pid {holder.pid}\)"):
            run_job(cfg, Stop())
    finally:
        holder.kill()
        holder.wait()

    # the run dir holds another job's checkpoint: prepare fails, and job.json is this run's, saying why
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step-000010")
    (tmp_path / "job.json").write_text('{"stage": "running", "processes": []}')
    with pytest.raises(TbaError, match="other settings"):
        run_job(with_overrides(cfg, trainer={"lr": 1e-5}), Stop())
    state = json.loads((tmp_path / "job.json").read_text())
    assert state["stage"] == "stopped" and "other settings (trainer.lr" in state["failed"]


@pytest.mark.slow  # a broker of its own
def test_a_broker_that_cannot_restart_yet_is_tried_again_and_the_job_goes_on(tmp_path, caplog):
    """Its port held a moment (a client's socket can be given it while the broker is away): a warning and
    another try a few seconds later, never the end of the job's supervision."""
    import logging
    import socket

    from ops.broker import job_broker

    cfg = local_job(tmp_path)
    supervisor = Supervisor(cfg)
    supervisor.broker = job_broker(cfg)
    for p in supervisor.processes:
        p.done = "stopped"  # the tick's other work: none
    with socket.socket() as holder, caplog.at_level(logging.WARNING, logger="tba.supervisor"):
        holder.bind(("127.0.0.1", cfg.broker.port))
        holder.listen()
        assert supervisor.tick()
        assert "the broker did not start" in caplog.text and supervisor.broker.status() is None
        assert supervisor.tick() and supervisor.broker_restarts == 1  # not before BROKER_RETRY_S
    supervisor.next_broker_start = 0.0
    try:
        assert supervisor.tick() and supervisor.broker.status() is not None
        assert supervisor.broker_restarts == 2
    finally:
        supervisor.broker.stop()
