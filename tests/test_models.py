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


def test_local_folder_loads_and_is_fingerprinted(tiny_model_dir):
    loaded = models.load_model(str(tiny_model_dir))
    assert loaded.dtype == "float32" and loaded.device == "cpu"
    assert loaded.fingerprint == models.resolve(str(tiny_model_dir))[2]


@pytest.mark.integration
def test_embedded_model_is_converted_once_and_cached():
    models.resolve("default")  # converts if this machine has not yet
    path, name, fingerprint, info = models.resolve("default")
    assert name == "smollm2-135m-instruct"
    assert (models.cache_dir() / "models").exists() and path.startswith(str(models.cache_dir()))
    assert info["converted"] is False  # the second resolve reads the cache
    assert fingerprint == models.file_sha256(models.embedded_gguf_path())[:16]
