"""`tba`: thin commands that read the config and call one function each."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click

from ops.broker import configured_broker
from ops.config import TbaConfig, load_config, with_overrides
from ops.errors import TbaError
from ops.registry import configured_registry
from tba.elastic import prompts, scale
from tba.gateway import gateway
from tba.logs import configure_logging
from tba.profiling import profiled
from tba.signals import exit_unfinished_after, stop_on_signals


class Context:
    def __init__(self, config_path: str | None, verbose: bool = False):
        self.config_path = config_path
        self.verbose = verbose
        self._cfg: TbaConfig | None = None

    @property
    def cfg(self) -> TbaConfig:
        if self._cfg is None:
            self._cfg = load_config(self.config_path)
        return self._cfg

    def job(self, create: bool = False) -> TbaConfig:
        """The config with the job's namespace resolved (ops.job.for_job); create: this command starts it."""
        from ops.job import for_job

        return for_job(self.cfg, create)


metrics_port_option = click.option(
    "--metrics-port", type=int, default=None, help="Serve Prometheus metrics on 127.0.0.1:PORT/metrics."
)


@click.group()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="TBA_CONFIG", help="YAML config file.")
@click.option("--verbose", is_flag=True, help="Debug lines too, kafka-python's among them.")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, verbose: bool) -> None:
    """tba-stream: asynchronous off-policy post-training (Trajectory Balance) on Apache Kafka."""
    configure_logging(verbose)
    ctx.obj = Context(config_path, verbose)


def local_server_group(name: str, about: str, configured, describe) -> click.Group:
    """`tba NAME start|stop|status` for a server run as a local process: configured(cfg) makes it (with start, stop
    and status), describe(status) says where it answers."""

    @cli.group(name, help=about)
    def group() -> None:
        pass

    @group.command("start", help="Resolve it from Maven Central (once), start it and wait until it answers.")
    @click.pass_obj
    def start(obj: Context) -> None:
        click.echo(f"{name} running: {describe(configured(obj.cfg).start())}")

    @group.command("stop")
    @click.pass_obj
    def stop(obj: Context) -> None:
        click.echo(f"{name} stopped" if configured(obj.cfg).stop() else f"{name} was not running")

    @group.command("status", help="Exits 1 when it is not running.")
    @click.pass_obj
    def status(obj: Context) -> None:
        server = configured(obj.cfg)
        running = server.status()
        if running is None:
            click.echo(f"{name} not running (data dir {Path(server.data_dir).resolve()})")
            sys.exit(1)
        click.echo(f"{name} running: {describe(running)}")

    return group


local_server_group("kafka", "The local Apache Kafka broker (KRaft).", configured_broker,
                   lambda s: f"bootstrap {s.bootstrap}, pid {s.pid}, data dir {s.data_dir}")  # fmt: skip
REGISTRY_ABOUT = "The local schema registry: Confluent's REST API (Apicurio Registry), its schemas kept in Kafka."
local_server_group("registry", REGISTRY_ABOUT, configured_registry,
                   lambda s: f"{s.url}, pid {s.pid}, data dir {s.data_dir}")  # fmt: skip


@cli.group()
def topics() -> None:
    """The namespaced topics (raw, curated, dlq, schemas, policy versions)."""


@topics.command("create")
@click.pass_obj
def topics_create(obj: Context) -> None:
    from ops.acls import create_role_acls
    from ops.topics import create_topics

    cfg = obj.job(create=True)
    created = create_topics(cfg)
    click.echo("\n".join(f"created {name}" for name in created) or "all topics exist")
    for line in create_role_acls(cfg):  # the roles kafka.principals names, each only what it needs
        click.echo(line)


@topics.command("describe")
@click.pass_obj
def topics_describe(obj: Context) -> None:
    from ops.topics import describe_topics

    for row in describe_topics(obj.job()):
        click.echo(json.dumps(row))


@cli.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.pass_obj
def produce(obj: Context, path: str) -> None:
    """Publish a JSON Lines file of trajectory groups written by any generator (see README)."""
    from ops.trajectory_producer import TrajectoryProducer
    from producers.jsonl import produce_file

    with TrajectoryProducer(obj.job()) as producer:
        sent, invalid = produce_file(path, producer)
    for bad in invalid:
        click.echo(f"{path}:{bad.line}: {bad.reason}", err=True)
    click.echo(f"published {sent} group(s); {len(invalid)} invalid line(s) skipped")
    if invalid:
        sys.exit(1)


@cli.command("filter")
@click.option(
    "--instance", default="0", show_default=True, help="Distinct per running filter; also its transactional id."
)
@click.option("--idle-exit", type=float, default=None, help="Exit after this many seconds without input.")
@click.option("--redrive", is_flag=True, help="Instead: send dead letters back to raw to be scored again, and exit.")
@click.option("--scorer", default=None, help="With --redrive: only the letters this scorer rejected.")
@metrics_port_option
@click.pass_obj
def filter_(
    obj: Context, instance: str, idle_exit: float | None, redrive: bool, scorer: str | None, metrics_port: int | None
) -> None:
    """Run one member of the filter group: raw -> scorers -> curated | dlq, exactly once."""
    from consumers.filter import FilterConsumer
    from ops.metrics import filter_metrics, metrics_served

    if redrive:
        from consumers.redrive import SCORERS
        from consumers.redrive import redrive as send_back
        from ops.topics import JobTopics

        if scorer is not None and scorer not in SCORERS:
            raise click.BadParameter(f"{scorer!r} is none of {', '.join(SCORERS)}", param_hint="--scorer")
        topics = JobTopics(obj.job())
        click.echo(f"re-drove {send_back(topics, scorer)} dead letter(s) to {topics.raw}")
        return

    stop = stop_on_signals()
    exit_unfinished_after(stop, 10.0, f"filter {instance}", "its open transaction is aborted, the batch read again")
    worker = FilterConsumer(obj.job(), instance=instance)
    try:
        with metrics_served(metrics_port, lambda: filter_metrics(worker, instance)):
            stats = worker.run(stop, idle_exit_s=idle_exit)
    finally:
        worker.close()
    click.echo(
        f"filter {instance}: consumed {stats.consumed}, accepted {stats.accepted}, rejected {dict(stats.rejected)}"
    )


@cli.command()
@click.option("--index", default=0, show_default=True, help="Names this searcher (searcher-INDEX) and seeds it.")
@click.option("--batches", type=int, default=None, help="Stop after this many batches (default: run until stopped).")
@metrics_port_option
@click.pass_obj
def search(obj: Context, index: int, batches: int | None, metrics_port: int | None) -> None:
    """Run one searcher: join the searchers' group over the prompts topic, sample, reward, publish, swap weights."""
    from ops.metrics import metrics_served, searcher_metrics
    from producers.searcher import build_searcher

    stop = stop_on_signals()
    # within the supervisor's 30 s: a batch Kafka has not acked by then is not committed, its prompts are redone
    exit_unfinished_after(stop, 20.0, f"searcher {index}", "its unacknowledged batch's prompts are taken again")
    searcher = build_searcher(obj.job(), index)
    try:
        with metrics_served(metrics_port, lambda: searcher_metrics(searcher)):
            stats = searcher.run(stop, max_batches=batches)
    finally:
        searcher.close()
    click.echo(
        f"searcher {index}: {stats.groups} groups in {stats.batches} batches, mean reward {stats.mean_reward:.3f}"
    )


@cli.command()
@metrics_port_option
@click.pass_obj
def train(obj: Context, metrics_port: int | None) -> None:
    """Run the TB trainer: curated -> replay buffer -> TB loss -> new policy versions; resumes from run_dir."""
    from trainer.job import run_trainer

    stop = stop_on_signals()  # the trainer checkpoints, then exits
    trainer = run_trainer(obj.job(create=True), stop, metrics_port=metrics_port)
    click.echo(f"trainer stopped at step {trainer.step}, policy version {trainer.policy_version}")


def _bound(value: str | None, name: str) -> dict:
    """An offset (an integer >= 0) or a time (ISO 8601, UTC unless it says otherwise) as fill() arguments."""
    from datetime import UTC, datetime

    if value is None:
        return {}
    if value.lstrip("-").isdigit():
        if int(value) < 0:
            raise click.BadParameter("an offset is 0 or more", param_hint=f"--{name}")
        return {f"{name}_offset": int(value)}
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise click.BadParameter("an offset (integer) or an ISO 8601 time", param_hint=f"--{name}") from exc
    return {f"{name}_time_ms": int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp() * 1000)}


@cli.command()
@click.option("--from", "start", default=None, help="First offset (of each partition) or time (ISO 8601) of curated.")
@click.option("--to", "end", default=None, help="Offset or time to stop before; default: curated's current end.")
@click.option("--live", is_flag=True, help="Also keep reading the groups live searchers write from now on.")
@click.option("--init", default=None, help="Start from this checkpoint's weights (a checkpoint folder or a run dir).")
@click.option("--job", "job_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Replay the history of the job in this run dir (default: kafka.namespace's).")  # fmt: skip
@metrics_port_option
@click.pass_obj
def replay(
    obj: Context,
    start: str | None,
    end: str | None,
    live: bool,
    init: str | None,
    job_dir: str | None,
    metrics_port: int | None,
) -> None:
    """Train a new policy on a past range of a job's curated topic, in trainer.run_dir (which must be its own)."""
    from ops.job import recorded_namespace
    from trainer.checkpoint import checkpoint_at
    from trainer.job import run_trainer

    cfg = obj.cfg
    if job_dir is not None:
        namespace = recorded_namespace(job_dir)
        if namespace is None:
            raise click.BadParameter(f"{job_dir} holds no job (no config.yaml with its namespace)", param_hint="--job")
        cfg = with_overrides(cfg, kafka={"namespace": namespace})
    elif cfg.kafka.namespace is None:
        raise click.UsageError("which job's history? Name its run dir with --job RUN_DIR, or set kafka.namespace")

    bounds = {**_bound(start, "from"), **_bound(end, "to")}
    for unit in ("offset", "time_ms"):
        if bounds.get(f"from_{unit}", -1) >= bounds.get(f"to_{unit}", float("inf")):
            raise click.BadParameter(f"{end} is not after --from {start}: the range is empty", param_hint="--to")
    trainer = run_trainer(cfg, stop_on_signals(), replay=bounds, live=live, metrics_port=metrics_port,
                          init=checkpoint_at(init) if init else None)  # fmt: skip
    click.echo(f"replay trained {trainer.step} steps on {len(trainer.buffer)} groups")


@cli.group()
def weights() -> None:
    """The weight-sync gRPC service (the trainer can also host it in-process)."""


@weights.command("serve")
@click.pass_obj
def weights_serve(obj: Context) -> None:
    """Serve policy versions on weights.host:weights.port until Ctrl-C / SIGTERM."""
    from trainer.weight_sync import serve

    stop = stop_on_signals()
    serve(obj.job(), stop)


@cli.command("inspect")
@click.option("--scan", default=10_000, show_default=True, help="Records read from the end of each partition.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.pass_obj
def inspect_(obj: Context, scan: int, as_json: bool) -> None:
    """Topics, filter lag, groups and reward per policy version, dead letters by reason, weight versions."""
    from tba.inspection import inspect_job

    report = inspect_job(obj.job(), scan)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    from tba.inspection import print_tables

    print_tables(report)


@cli.command()
@click.argument("topic")
@click.option("--from", "start", default=None, help="First offset (of each partition) or time (ISO 8601).")
@click.option(
    "--last",
    default=10,
    show_default=True,
    type=click.IntRange(min=1),
    help="Without --from: this many of each partition.",
)
@click.option("--follow", "-f", is_flag=True, help="Then print what arrives, until Ctrl-C.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a record, its value whole.")
@click.pass_obj
def tail(obj: Context, topic: str, start: str | None, last: int, follow: bool, as_json: bool) -> None:
    """A topic's records decoded: raw, curated, dlq, policy-versions or prompts (or a full topic name)."""
    from tba.tail import lines

    for line in lines(obj.job(), topic, _bound(start, "from"), last, follow, as_json, stop_on_signals()):
        click.echo(line)


@cli.command("run")
@click.argument("config", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--keep-broker", is_flag=True, help="Leave a local broker it starts running (run.keep_broker).")
@click.pass_obj
def run_(obj: Context, config: str | None, keep_broker: bool) -> None:
    """The whole job on one machine: broker, topics, trainer + weight sync, searchers, filters, supervised.

    Ctrl-C / SIGTERM (or run.budget_s) stops it in order, the trainer checkpointing first; run it again
    with the same trainer.run_dir to resume. Stopped by its budget or max_steps, it then evaluates the policy
    it stopped with (`tba report`'s last point). CONFIG defaults to --config, else the embedded defaults.
    """
    from tba.live_view import shown
    from tba.supervisor import run_job

    cfg = load_config(config) if config else obj.cfg
    cfg = with_overrides(cfg, run={"keep_broker": True}) if keep_broker else cfg
    stop = stop_on_signals()
    with shown(cfg, obj.verbose) as (refresh, progress):
        state = run_job(cfg, stop, refresh, progress)
    click.echo(f"job stopped after {state['elapsed_s']:.0f}s; logs and metrics in {cfg.trainer.run_dir}")
    if not stop.is_set():  # its budget or max_steps ended it: the report's last point is the policy it stopped with
        from trainer.job import evaluate_at_stop

        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C or SIGTERM now skip the evaluation
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        click.echo(f"evaluating the policy it stopped with on {cfg.trainer.eval_prompts} held-out problems")
        evaluate_at_stop(cfg)


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", default=None, help="Where to write (default: RUN_DIR/report).")
def report(run_dir: str, out: str | None) -> None:
    """PNG plots (reward and held-out accuracy vs wall time and step, throughput, staleness, rejects) + report.md."""
    from tba.report import write_report

    click.echo(f"wrote {write_report(run_dir, out) / 'report.md'}")


@cli.command()
@click.pass_obj
def demo(obj: Context) -> None:
    """The data plane end to end on the local broker: produce, filter, replay buffer, report."""
    from tba.demo import run_demo

    run_demo(obj.cfg)


cli.add_command(scale)  # tba/elastic.py: `tba scale searchers N`, `tba prompts load FILE`
cli.add_command(prompts)
cli.add_command(gateway)  # tba/gateway.py: `tba gateway`


def main() -> None:
    try:
        profiled(lambda: cli(standalone_mode=True))  # tba/profiling.py: only when TBA_PROFILE_DIR is set
    except TbaError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except Exception as exc:
        from kafka.errors import AuthorizationError  # here: kafka-python takes a second to import

        if not isinstance(exc, AuthorizationError):
            raise
        # a refusal that no role turned into its own line (ops/acls.py): still one line
        click.echo(f"error: the Kafka brokers refused this principal: {exc} (ACLs from `tba topics create`)", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
