"""The models every engine test runs on: :mod:`hessfast.zoo`'s problems, under the name the tests
import (``from models import zoo``)."""

import pytest

from hessfast.zoo import (  # noqa: F401
    MODELS,
    LogitsOnly,
    cnn_bn,
    gpt,
    hf_gpt2,
    hf_llama,
    mlp,
    resnet,
)


def params(names=MODELS, slow=()):
    """``names`` as pytest parameters, the Hugging Face problems (seconds each: they build a
    ``transformers`` model) and those in ``slow`` marked ``slow``: ``pytest -m "not slow"`` keeps
    the small models."""
    return [
        pytest.param(n, id=n, marks=pytest.mark.slow if n.startswith("hf_") or n in slow else ())
        for n in names
    ]
