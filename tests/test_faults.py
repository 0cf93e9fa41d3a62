"""Faults inside the engine: out of memory, failed loads; the engine recovers and loses nothing."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from conftest import HQ_ID, make_picture

from segmentation import ModelUnavailableError, ResourceExhaustedError, Segmenter
from segmentation import decoder as dec
from segmentation.service import ModelRegistry
from segmentation.settings import Settings


def _fail_once(monkeypatch, target, name):
    original = getattr(target, name)
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, flaky)
    return calls


def test_out_of_memory_while_encoding_sheds_the_cache_and_the_next_request_succeeds(monkeypatch):
    segmenter = Segmenter.from_pretrained(HQ_ID, device="cpu")
    for seed in range(4):
        segmenter.embed(make_picture(64, 48, seed=seed))
    assert len(segmenter.cache) == 4
    _fail_once(monkeypatch, dec, "encode")
    picture = make_picture(64, 48, seed=99)
    with pytest.raises(ResourceExhaustedError, match="ran out of memory"):
        segmenter.embed(picture)
    assert len(segmenter.cache) == 2  # the older half was shed
    assert segmenter.segment(segmenter.embed(picture), [[[10, 10]]]).best.labels.shape == (48, 64)


def test_out_of_memory_while_decoding_is_reported_and_recovers(monkeypatch):
    segmenter = Segmenter.from_pretrained(HQ_ID, device="cpu")
    embedding = segmenter.embed(make_picture(64, 48))
    expected = segmenter.segment(embedding, [[[10, 10]]]).best.labels
    _fail_once(monkeypatch, dec, "decode")
    with pytest.raises(ResourceExhaustedError):
        segmenter.segment(embedding, [[[10, 10]]])
    np.testing.assert_array_equal(segmenter.segment(embedding, [[[10, 10]]]).best.labels, expected)


def test_other_errors_are_not_mistaken_for_out_of_memory(monkeypatch):
    segmenter = Segmenter.from_pretrained(HQ_ID, device="cpu")

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(dec, "encode", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        segmenter.embed(make_picture(32, 32))


def test_registry_remembers_a_failed_load_and_recovers_when_the_model_appears():
    attempts = []

    def loader(name, **kwargs):
        attempts.append(name)
        if len(attempts) == 1:
            raise ModelUnavailableError(f"Model {name!r} could not be loaded: offline")
        return Segmenter.from_pretrained(name, device="cpu")

    registry = ModelRegistry(Settings(model=HQ_ID), loader=loader, retry_after=0.2)
    with pytest.raises(ModelUnavailableError, match="offline"):
        registry.get()
    assert registry.status(HQ_ID).startswith("unavailable: ")
    with pytest.raises(ModelUnavailableError):  # answered from memory, no new attempt yet
        registry.get()
    assert len(attempts) == 1
    deadline = time.monotonic() + 30  # retried once retry_after has passed: poll, never a fixed sleep
    while True:
        try:
            model = registry.get()
            break
        except ModelUnavailableError:
            assert time.monotonic() < deadline, "the load was never retried"
            time.sleep(0.02)
    assert model.model_id == HQ_ID
    assert registry.status(HQ_ID) == "loaded" and len(attempts) == 2
    assert registry.get() is registry.get()  # loaded once
