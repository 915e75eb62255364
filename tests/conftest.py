"""Shared fixtures. Nothing here downloads: models and data come from bundled packages, and tests
that need one skip with the install command when it is absent."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

# Never reach for a model hub, and keep any HF cache out of the user's home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="tsq-hf-"))

from tsqlora_ext import bundled  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _bundled(fn):
    try:
        return fn()
    except bundled.BundledDataMissing as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def minilm_dir():
    return _bundled(bundled.minilm_dir)


@pytest.fixture(scope="session")
def rotten_tomatoes():
    return _bundled(bundled.rotten_tomatoes)


@pytest.fixture(scope="session")
def bbc_news():
    return _bundled(bundled.bbc_news)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
