"""Bags of models (`demucs.bag`): their old class path, `demucs.apply.BagOfModels`, still
imports and unpickles."""
from __future__ import annotations

import io
import pickle

import torch

from demucs import apply, bag
from demucs.bag import BagOfModels, sub_models

from helpers import Scaler, SOURCES


def small_bag() -> BagOfModels:
    first = Scaler(SOURCES, [1., 2., 3., 4.], samplerate=1000, segment=0.1)
    second = Scaler(SOURCES, [4., 3., 2., 1.], samplerate=1000, segment=0.1)
    return BagOfModels([first, second], weights=[[1, 0, 1, 1], [1, 1, 0, 1]])


def same_bag(one: BagOfModels, other: BagOfModels) -> bool:
    mix = torch.randn(1, 2, 300)
    return (one.weights == other.weights and one.sources == other.sources and
            torch.equal(apply.apply_model(one, mix, shifts=0),
                        apply.apply_model(other, mix, shifts=0)))


def test_old_class_path_is_the_class() -> None:
    assert apply.BagOfModels is bag.BagOfModels
    assert apply.max_allowed_segment is bag.max_allowed_segment


def test_bag_pickled_under_the_old_path_loads() -> None:
    original = small_bag()
    data = pickle.dumps(original, protocol=2)  # class references as text lines
    new_path, old_path = b"demucs.bag\nBagOfModels\n", b"demucs.apply\nBagOfModels\n"
    assert new_path in data
    loaded = pickle.loads(data.replace(new_path, old_path))
    assert type(loaded) is BagOfModels and same_bag(loaded, original)


def test_bag_round_trips_through_torch_save() -> None:
    original = small_bag()
    buffer = io.BytesIO()
    torch.save(original, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)  # a whole module: trusted data only
    assert same_bag(loaded, original)


def test_sub_models() -> None:
    pair = small_bag()
    assert sub_models(pair) == list(pair.models)
    assert sub_models(pair.models[0]) == [pair.models[0]]
