"""Shared fixtures: an isolated ltpost cache, one torch thread, the embedded tokenizer and tiny model."""

from __future__ import annotations

import os

import pytest
import torch

# One thread: on the 2-core CI machines a second thread makes tiny-model steps slower and noisier (notes).
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def ltpost_cache(tmp_path_factory):
    """Built-in models are materialized into a fresh folder per test session (proves the first-use path)."""
    path = tmp_path_factory.mktemp("ltpost-cache")
    previous = os.environ.get("LTPOST_CACHE")
    os.environ["LTPOST_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("LTPOST_CACHE", None)
    else:
        os.environ["LTPOST_CACHE"] = previous


@pytest.fixture(scope="session")
def tokenizer():
    from ltpost.models import load_tokenizer

    return load_tokenizer("ltpost:tiny-llama")


@pytest.fixture
def tiny_model():
    from ltpost.models import load_model

    return load_model("ltpost:tiny-llama")
