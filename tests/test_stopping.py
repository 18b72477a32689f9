"""Every role stops within its stop timeout whatever Kafka does: here, Kafka not answering at all."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from ops.broker import free_port
from ops.config import load_config, with_overrides
from ops.metrics import metric_rows
from tba.signals import stop_on_signals
from tba.supervisor import Supervisor
from tests.fault_injection import job_config
from tests.tiny_models import saved_tiny_llama, tiny_llama
from trainer.weight_sync import publish_remote

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # job processes and a broker of their own


def test_weights_serve_stops_on_sigterm_at_once_when_kafka_is_unreachable():
    port = free_port()
    env = {**os.environ, "TBA__KAFKA__BOOTSTRAP": f"127.0.0.1:{free_port()}", "TBA__KAFKA__NAMESPACE": "away",
           "TBA__WEIGHTS__PORT": str(port)}  # fmt: skip
    serve = subprocess.Popen([sys.executable, "-m", "tba.cli", "weights", "serve"], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        lines = []
        while not any("weight sync serving" in line for line in lines):
            lines.append(serve.stdout.readline())
            assert lines[-1] or serve.poll() is None, "".join(lines)
        started = time.monotonic()
        cfg = load_config(environ={}, weights={"port": port})
        publish_remote(cfg, f"127.0.0.1:{port}", tiny_llama(0).state_dict(), version=0, step=0)
        assert time.monotonic() - started < 5  # the release does not wait for the announcement on Kafka
        serve.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        output, _ = serve.communicate(timeout=30)
        assert time.monotonic() - stopping < 10  # it took over 15 s, the announcer's producer waiting on Kafka
    finally:
        if serve.poll() is None:
            serve.kill()
    assert serve.returncode == 0, output
    assert "announcements of policy versions still waiting on Kafka" in output and "left undone" in output


def test_a_second_ctrl_c_kills_what_the_first_asked_to_stop(cfg, tmp_path):
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        stop = stop_on_signals()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(2) and not stop.hurry.is_set()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.hurry.wait(2)
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])

    supervisor = Supervisor(with_overrides(cfg, trainer={"run_dir": str(tmp_path)}, weights={"port": 0}))
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(99)"
    stubborn = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout.readline().strip() == "up"
    supervisor.trainer.proc = stubborn  # a trainer that does not stop on SIGTERM (e.g. stuck on Kafka)
    hurry = threading.Event()
    threading.Timer(1.0, hurry.set).start()  # the second Ctrl-C, a second after the first
    started = time.monotonic()
    supervisor.terminate([supervisor.trainer], 120, hurry)
    assert 0.9 < time.monotonic() - started < 5 and supervisor.trainer.exit_codes == [-signal.SIGKILL]


def test_the_live_view_never_holds_the_supervisor_when_kafka_is_unreachable(tmp_path, monkeypatch):
    from tba import live_view

    monkeypatch.setattr(live_view, "KAFKA_EVERY_S", 0.5)
    cfg = load_config(environ={}, kafka={"bootstrap": f"127.0.0.1:{free_port()}", "namespace": "away"},
                      trainer={"run_dir": str(tmp_path)}, weights={"port": 0})  # fmt: skip
    supervisor, view = Supervisor(cfg), live_view.JobView(cfg)
    rows = [{"kind": "eval", "greedy_accuracy": a} for a in (0.25, 0.5)] + [{"kind": "train", "step": 1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for _ in range(4):
        started = time.monotonic()
        view(supervisor)
        assert time.monotonic() - started < 0.5  # a read of Kafka waits for the 30 s client timeout
        time.sleep(0.3)
    console = Console(file=io.StringIO(), width=120)
    console.print(view.renderable)
    assert f"waiting for Kafka at {cfg.kafka.bootstrap} to answer" in console.file.getvalue()
    assert "0.25 -> 0.50" in console.file.getvalue()  # the held-out accuracy, from the rows read once each


def test_every_role_stops_on_sigterm_within_its_stop_timeout_when_the_broker_is_gone(tmp_path):
    cfg = job_config(tmp_path, saved_tiny_llama(tmp_path / "model"))
    supervisor = Supervisor(cfg)
    try:
        supervisor.prepare()  # the job's own broker, to kill
        deadline = time.monotonic() + 240
        while not any(r["kind"] == "train" for r in metric_rows(Path(cfg.trainer.run_dir))):  # every role at work
            assert time.monotonic() < deadline, "the job took no step"
            supervisor.tick()
            time.sleep(0.5)
        supervisor.broker.kill()  # and no tick from here on: nothing restarts it
        time.sleep(3)  # no event to wait on: each role finds Kafka gone in its own time; 3 s puts it in a wait
        stopped = {}
        for p in supervisor.processes:
            started = time.monotonic()
            supervisor.terminate([p], cfg.run.stop_timeout_s if p is supervisor.trainer else 30.0)
            stopped[p.name] = (round(time.monotonic() - started, 1), p.exit_codes[-1])
    finally:
        supervisor.terminate(supervisor.processes, 5)
        supervisor.broker.stop()
    print(stopped)
    # none killed for outstaying its timeout: each came out of its Kafka waits and exited on its own
    assert all(code != -signal.SIGKILL for _, code in stopped.values()), stopped


def test_a_burst_of_signals_stops_a_process_and_never_hangs_it():
    """Signals arriving while a handler is inside another's Event.set once left a trainer waiting forever on the
    Event's own lock (seen when a supervisor died: its death signal came on top of its SIGTERM)."""
    code = ("from tba.signals import stop_on_signals; stop = stop_on_signals(); print('up', flush=True); "
            "stop.wait(); print('stopped', flush=True); stop.hurry.wait(); print('hurried', flush=True)")  # fmt: skip
    for _ in range(20):
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        hung = threading.Timer(20, child.kill)  # a hung child is killed, and its output ends short
        hung.start()
        try:
            assert child.stdout.readline().strip() == "up"
            for _ in range(2000):
                os.kill(child.pid, signal.SIGTERM)
            # Unix folds a burst of one signal into as few as one delivery, so the burst must stop the process
            # but may not hurry it; a signal sent once it has stopped is a second delivery and must.
            assert child.stdout.readline().strip() == "stopped"
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
            assert child.stdout.readline().strip() == "hurried"
            assert child.wait() in (0, -signal.SIGTERM)  # late signals may land as the interpreter exits
        finally:
            hung.cancel()
            child.kill()
