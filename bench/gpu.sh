#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, in one go: GPU vLLM in an environment of its own (.venv-gpu), the
# vLLM tests on the GPU, then the head-to-head on configs/math.yaml (TBA with vLLM searchers vs the
# synchronous baseline vs TRL)  ->  bench/results/learning_gpu.json (speedup_vs_sync, speedup_vs_trl).
#
#   bench/gpu.sh [--budget-s 1200] [--seeds "0 1"]
#   bench/gpu.sh --check      no GPU needed: the plan, the requirements and the benchmark's arguments
#
# vllm==0.33.0 brings its own CUDA torch (2.14.0); everything else is the project's pins (setup.cfg).
# Needs Java 17 and Maven for the local Kafka broker (ops/dev.sh installs them), and network access.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TBA_GPU_VENV:-.venv-gpu}"
vllm="vllm==0.33.0"
budget=1200 seeds=0 check=0
while [ $# -gt 0 ]; do
  case "$1" in
    --budget-s) budget="$2"; shift 2 ;;
    --seeds) seeds="$2"; shift 2 ;;
    --check) check=1; shift ;;
    *) echo "usage: $0 [--budget-s S] [--seeds \"0 1\"] | --check" >&2; exit 2 ;;
  esac
done

# the project's requirements (and its test and bench extras) but torch, which vLLM chooses
requirements=$(python3 - <<'EOF'
import configparser
cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
extras = cfg["options.extras_require"]
lines = cfg["options"]["install_requires"].split() + extras["test"].split() + extras["bench"].split()
print(" ".join(line for line in lines if not line.startswith("torch==")))
EOF
)
bench=(bench/learning.py --config configs/math.yaml --budget-s "$budget" --seeds $seeds
       --out bench/results/learning_gpu.json)

if [ "$check" = 1 ]; then
  echo "would install into $venv: $vllm, then: $requirements"
  echo "would run: pytest tests/test_vllm.py; TBA__SEARCHER__BACKEND=vllm python ${bench[*]}"
  python=.venv/bin/python && [ -x "$python" ] || python=python3  # the CPU environment, where there is one
  exec "$python" "${bench[0]}" --help >/dev/null
fi
if ! nvidia-smi -L >/dev/null 2>&1; then
  echo "no NVIDIA GPU here (nvidia-smi -L found none); bench/gpu.sh --check runs what needs none" >&2
  exit 2
fi
for tool in java mvn; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: ./ops/dev.sh installs Java 17 and Maven" >&2; exit 2; }
done

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "$vllm"
"$venv/bin/pip" install -q --disable-pip-version-check $requirements
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps -e .
nvidia-smi -L
"$venv/bin/python" -m pytest -q tests/test_vllm.py
TBA__SEARCHER__BACKEND=vllm "$venv/bin/python" "${bench[@]}"
