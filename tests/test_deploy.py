"""deploy/: every manifest is valid Kubernetes (the strict schemas of one pinned version, offline) and
agrees with the project: the commands and options it runs exist, its tba config loads, and the ports,
paths, Secrets and names it wires together are the ones that config uses."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import kubernetes_validate
import yaml
from click.testing import CliRunner

from ops.config import load_config
from tba.cli import cli

KUBERNETES = "1.33.0"  # validated against this version's schemas (kubernetes-validate bundles them)
ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SECRET_TEMPLATES = "secrets.example.yaml"  # placeholders: in deploy/, never in the kustomization
POD_KINDS = {"Deployment", "Job"}


def manifests() -> list[tuple[str, dict]]:
    """(file name, object) for every object in deploy/*.yaml but the kustomization."""
    found = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return found


def one(kind: str, name: str) -> dict:
    (doc,) = [d for _, d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def pod(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def container(doc: dict) -> dict:
    (c,) = pod(doc)["containers"]
    return c


def workloads() -> list[dict]:
    return [d for _, d in manifests() if d["kind"] in POD_KINDS]


def config_map() -> tuple[dict, str]:
    (cm,) = [d for _, d in manifests() if d["kind"] == "ConfigMap"]
    ((key, text),) = cm["data"].items()
    return cm, key


def job_config(tmp_path: Path, uncomment: str | None = None):
    """The ConfigMap's tba config as load_config reads it (no environment); uncomment: lines starting so."""
    cm, key = config_map()
    text = cm["data"][key]
    if uncomment:
        text = re.sub(rf"^(\s*)# ({uncomment})", r"\1\2", text, flags=re.M)
    path = tmp_path / key
    path.write_text(text)
    return load_config(path, environ={})


def expanded(c: dict) -> list[str]:
    """command + args with $(VAR) replaced, as the kubelet does (only for variables the container defines)."""
    defined = {e["name"] for e in c.get("env", [])}
    words = [*c.get("command", []), *c.get("args", [])]
    for word in words:
        for var in re.findall(r"\$\((\w+)\)", word):
            assert var in defined, f"{c['name']}: $({var}) is not an env variable of the container"
    return [re.sub(r"\$\((\w+)\)", lambda m: f"<{m.group(1)}>", w) for w in words]


def tba_argv(c: dict) -> list[str]:
    """The arguments `tba` gets in this container: run as `tba ...` or as `torchrun ... -m tba.cli ...`."""
    words = expanded(c)
    if words[0] == "tba":
        return words[1:]
    assert words[0] == "torchrun", f"{c['name']} runs {words[0]}, neither tba nor torchrun"
    from torch.distributed.run import get_args_parser

    try:
        args = get_args_parser().parse_args(words[1:])  # torchrun's own options exist and parse
    except SystemExit:
        raise AssertionError(f"{c['name']}: torchrun refuses {words[1:]} (its message is above)") from None
    assert args.module and args.training_script == "tba.cli", words
    return args.training_script_args


def subcommand(argv: list[str]) -> list[str]:
    """The command's words: `--config FILE search --metrics-port 9400` -> ["search"]."""
    words = argv[2:] if argv[:1] == ["--config"] else argv
    return words[: next((i for i, w in enumerate(words) if w.startswith("-")), len(words))]


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def volume_mount(doc: dict, volume: str) -> str:
    (mount,) = [m["mountPath"] for m in container(doc).get("volumeMounts", []) if m["name"] == volume]
    return mount


def volume(doc: dict, name: str) -> dict:
    (v,) = [v for v in pod(doc).get("volumes", []) if v["name"] == name]
    return v


def test_every_manifest_is_valid_kubernetes():
    errors = []
    for file, doc in manifests():
        try:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
            where = "/".join(str(p) for p in getattr(exc, "path", []))
            errors.append(f"{file}: {doc.get('kind')} {doc['metadata'].get('name')}: {where}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_the_kustomization_applies_every_manifest_but_the_secret_templates():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    files = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml", SECRET_TEMPLATES}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert {i["name"] for i in kustomization["images"]} == {
        c["image"].split(":")[0] for c in map(container, workloads())
    }


def test_each_role_has_its_kind_in_one_namespace():
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in manifests()}
    expected = {("Namespace", "tba"), ("ConfigMap", "tba-config"), ("Job", "tba-topics"), ("Job", "tba-trainer"),
                ("Service", "tba-trainer"), ("PersistentVolumeClaim", "tba-trainer-run"),
                ("Deployment", "tba-searcher"), ("Deployment", "tba-filter")}  # fmt: skip
    assert expected <= kinds
    assert {d["metadata"].get("namespace") for _, d in manifests() if d["kind"] != "Namespace"} == {"tba"}
    for doc in workloads():
        if doc["kind"] == "Deployment":  # a selector that picks its own pods
            assert (
                doc["spec"]["selector"]["matchLabels"].items() <= doc["spec"]["template"]["metadata"]["labels"].items()
            )
    roles = {name: subcommand(tba_argv(container(one(kind, name)))) for kind, name in kinds if kind in POD_KINDS}
    assert roles == {"tba-topics": ["topics", "create"], "tba-trainer": ["train"], "tba-searcher": ["search"],
                     "tba-filter": ["filter"]}  # fmt: skip
    assert expanded(container(one("Job", "tba-trainer")))[0] == "torchrun"  # data parallel
    for doc in (one("Job", "tba-trainer"), one("Deployment", "tba-searcher")):  # the GPU roles ask for one
        assert int(container(doc)["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_every_tba_command_and_option_in_the_manifests_exists():
    runner = CliRunner()
    for doc in workloads():
        argv = tba_argv(container(doc))
        result = runner.invoke(cli, [*argv, "--help"])
        assert result.exit_code == 0, f"{doc['metadata']['name']}: tba {' '.join(argv)}: {result.output}"
        usage = result.output.splitlines()[0]
        assert "COMMAND" not in usage, f"{doc['metadata']['name']}: tba {' '.join(argv)} names a group, not a command"


def test_the_config_map_loads_and_the_manifests_use_its_ports_and_paths(tmp_path):
    cfg = job_config(tmp_path)  # unknown fields or wrong values raise, naming the field
    cm, key = config_map()
    assert cfg.kafka.namespace, "pods share no run dir to record a namespace in: kafka.namespace must be set"
    assert cfg.weights.host == "0.0.0.0", "the weight-sync service must listen where the Service can reach it"

    trainer, service = one("Job", "tba-trainer"), one("Service", "tba-trainer")
    (port,) = service["spec"]["ports"]
    assert port["port"] == cfg.weights.port
    (container_port,) = [p for p in container(trainer)["ports"] if p["name"] == port["targetPort"]]
    assert container_port["containerPort"] == cfg.weights.port
    assert container(trainer)["readinessProbe"]["tcpSocket"]["port"] in (port["targetPort"], cfg.weights.port)
    assert service["spec"]["selector"].items() <= trainer["spec"]["template"]["metadata"]["labels"].items()
    for doc in workloads():  # the Service reaches the trainer's pods and no other
        if doc["metadata"]["name"] != "tba-trainer":
            assert not service["spec"]["selector"].items() <= doc["spec"]["template"]["metadata"]["labels"].items()
    host, target_port = cfg.searcher.weights_target.rsplit(":", 1)
    namespace = service["metadata"]["namespace"]
    assert host in (
        f"{service['metadata']['name']}.{namespace}.svc",
        f"{service['metadata']['name']}.{namespace}.svc.cluster.local",
    )
    assert int(target_port) == port["port"]

    # every role reads this config, from where the ConfigMap is mounted
    for doc in workloads():
        argv = tba_argv(container(doc))
        assert volume(doc, "config")["configMap"]["name"] == cm["metadata"]["name"]
        assert option(argv, "--config") == f"{volume_mount(doc, 'config')}/{key}"
        if "--metrics-port" in argv:  # probes ask the port the role serves its metrics on
            for probe in ("startupProbe", "livenessProbe"):
                if probe in container(doc):
                    text = " ".join(container(doc)[probe]["exec"]["command"])
                    assert f"127.0.0.1:{option(argv, '--metrics-port')}/metrics" in text
    # the trainer's run dir (checkpoints) is on its persistent volume
    claim = volume(trainer, "run")["persistentVolumeClaim"]["claimName"]
    assert one("PersistentVolumeClaim", claim)
    assert Path(cfg.trainer.run_dir).is_relative_to(volume_mount(trainer, "run"))


def secrets() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for file, d in manifests() if d["kind"] == "Secret" and file == SECRET_TEMPLATES}


def test_credentials_come_from_the_secret_templates_under_the_names_the_config_reads(tmp_path):
    cfg, templates = job_config(tmp_path), secrets()
    assert not [d for _, d in manifests() if d["kind"] == "Secret" and d["metadata"]["name"] not in templates]
    for name, doc in templates.items():  # placeholders, clearly marked, never a real value
        assert all(v.startswith("REPLACE-ME") for v in doc["stringData"].values()), name
    env_of = {}
    for doc in workloads():
        env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container(doc).get("env", [])
               if "secretKeyRef" in e.get("valueFrom", {})}  # fmt: skip
        for ref in env.values():
            assert ref["name"] in templates and ref["key"] in templates[ref["name"]]["stringData"], ref
        env_of[doc["metadata"]["name"]] = env
        for v in pod(doc).get("volumes", []):
            if "secret" in v:
                template = templates[v["secret"]["secretName"]]
                assert all(i["key"] in template["stringData"] for i in v["secret"].get("items", []))
    # every role talks to Kafka with the password; the trainer checks both tokens, searchers send theirs
    assert all(cfg.kafka.sasl_password_env in env for env in env_of.values())
    assert {cfg.weights.publish_token_env, cfg.weights.subscribe_token_env} <= env_of["tba-trainer"].keys()
    assert cfg.weights.subscribe_token_env in env_of["tba-searcher"]
    assert cfg.weights.publish_token_env not in env_of["tba-searcher"]


def test_weight_sync_tls_as_the_config_map_says_to_turn_it_on(tmp_path):
    """Uncommenting the ConfigMap's tls_ lines gives a config whose files the TLS Secret's mounts hold."""
    cfg = job_config(tmp_path, uncomment="tls_")
    assert cfg.weights.tls_cert and cfg.weights.tls_key and cfg.weights.tls_ca
    tls = secrets()["tba-weights-tls"]["stringData"]
    trainer, searcher = one("Job", "tba-trainer"), one("Deployment", "tba-searcher")
    for path in (cfg.weights.tls_cert, cfg.weights.tls_key, cfg.weights.tls_ca):
        assert str(path.parent) == volume_mount(trainer, "weights-tls") and path.name in tls
    items = volume(searcher, "weights-tls")["secret"]["items"]
    assert [i["path"] for i in items] == [cfg.weights.tls_ca.name]  # searchers get the CA, not the key
    assert str(cfg.weights.tls_ca.parent) == volume_mount(searcher, "weights-tls")


def test_the_image_installs_the_packages_setup_cfg_names():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    packages = [p.rstrip("*") for p in setup["options.packages.find"]["include"].split()]
    copied = [
        line.split()[1:-1] for line in (DEPLOY / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")
    ]
    sources = {word for words in copied for word in words}
    assert set(packages) <= sources
    assert {"setup.cfg", "pyproject.toml", "README.md"} <= sources  # README.md: setup.cfg's long_description
    assert "pip install ." in (DEPLOY / "Dockerfile").read_text()


def test_the_commands_in_docs_deploy_name_what_deploy_holds():
    """docs/deploy.md's kubectl lines: the namespace, objects, label selectors and tba commands exist."""
    lines = [line for line in (ROOT / "docs" / "deploy.md").read_text().splitlines() if line.startswith("kubectl")]
    objects = {(d["kind"].lower(), d["metadata"]["name"]) for _, d in manifests()}
    short = {"deploy": "deployment", "svc": "service"}
    components = {d["metadata"].get("labels", {}).get("app.kubernetes.io/component") for _, d in manifests()}
    namespaces = {d["metadata"]["name"] for _, d in manifests() if d["kind"] == "Namespace"}
    runner = CliRunner()
    assert lines
    for line in lines:
        if namespace := re.match(r"kubectl -n (\S+)", line):
            assert namespace.group(1) in namespaces, line
        for kind, name in re.findall(r"(?<!\S)(job|deployment|deploy|service|svc)/([\w-]+)(?!\S)", line):
            assert (short.get(kind, kind), name) in objects, line
        for selector in re.findall(r"component in \(([^)]*)\)", line):
            assert set(selector.split(",")) <= components, line
        if " -- tba " in line:
            argv = line.split(" -- tba ", 1)[1].split()
            assert runner.invoke(cli, [*argv, "--help"]).exit_code == 0, line
