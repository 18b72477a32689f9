"""Every role stops within its stop timeout whatever Kafka does: here, Kafka not answering at all."""

import os
import signal
import subprocess
import sys
import time

from ops.broker import free_port
from ops.config import load_config
from tests.tiny_models import tiny_llama
from trainer.weight_sync import publish_remote


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
