"""Shared fixtures: a tiny randomly initialised Llama built in process, with SmolLM2-135M's tokenizer.

The suite never loads the 1.5B default model: integration tests use the embedded ``smollm2-135m``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "programs"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from rosa2_dspy import models

    path, _, _, _ = models.resolve("smollm2-135m")  # converts the embedded GGUF once, then reads the cache
    return AutoTokenizer.from_pretrained(path)


def make_tiny_model(tokenizer, seed: int = 0, init: float = 0.02):
    """A 2-layer Llama. At the usual init (0.02) it greedily repeats one token; ``init=0.2`` makes its
    greedy replies vary token by token, which tests of token-exact equality need to mean anything."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, initializer_range=init, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


@pytest.fixture()
def tiny_engine(tokenizer):
    from rosa2_dspy.engine import LocalEngine

    return LocalEngine(make_tiny_model(tokenizer), tokenizer, name="tiny")


@pytest.fixture()
def lively_engine(tokenizer):
    """A tiny engine whose greedy replies differ token by token (see make_tiny_model)."""
    from rosa2_dspy.engine import LocalEngine

    return LocalEngine(make_tiny_model(tokenizer, init=0.2), tokenizer, name="lively")


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory):
    """The tiny model saved as a Hugging Face folder, for code paths that load from disk (the CLI)."""
    path = tmp_path_factory.mktemp("tiny-model")
    make_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def real_engine():
    from rosa2_dspy.engine import LocalEngine

    return LocalEngine.shared("smollm2-135m")  # the suite never needs the 1.5B default


@pytest.fixture(autouse=True)
def _dspy_defaults():
    import dspy

    yield
    dspy.configure(lm=None, adapter=None)


@pytest.fixture(scope="session")
def lively_model_dir(tokenizer, tmp_path_factory):
    """The lively tiny model as a Hugging Face folder: greedy replies that vary token by token, so sessions get
    rejected replies to train on (the plain tiny model's replies are blank)."""
    path = tmp_path_factory.mktemp("lively-model")
    make_tiny_model(tokenizer, init=0.2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
