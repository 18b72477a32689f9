"""`tba gateway`: the OpenAI-compatible endpoint on the policy being trained (producers/gateway.py)."""

from __future__ import annotations

import click


@click.command("gateway")
@click.option("--host", default=None, help="Listen on this address (default: gateway.host).")
@click.option("--port", type=int, default=None, help="Listen on this port (default: gateway.port; 0: any free one).")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on 127.0.0.1:PORT/metrics.")
@click.pass_obj
def gateway(obj, host: str | None, port: int | None, metrics_port: int | None) -> None:
    """Serve /v1/chat/completions, /v1/completions, /v1/models and /v1/rewards with the current policy.

    A request's n completions are one group; posting their rewards to /v1/rewards produces it to raw.
    Ctrl-C / SIGTERM: stop taking requests, answer those in flight, send groups still without rewards to the dlq.
    """
    from producers.gateway import serve_gateway
    from tba.signals import stop_on_signals

    stop = stop_on_signals()
    served = serve_gateway(obj.job(), stop, host, port, metrics_port)
    stats = served.groups.stats
    click.echo(f"gateway stopped: {stats.produced} group(s) produced, {stats.expired} sent to the dlq")
