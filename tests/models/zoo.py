"""The models every engine test runs on: :mod:`hessfast.zoo`'s problems, under the name the tests
import (``from models import zoo``)."""

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
