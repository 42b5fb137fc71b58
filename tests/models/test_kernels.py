"""The kernels contract (models/kernels.py): every decoder the loader builds declares the kernels it
runs (PyTorch's by default), so the engine can ask any model for them, and `install` hands a
model's kernels to the model and to every layer that uses them."""

from __future__ import annotations

import torch

from llmos import quant
from llmos.models.kernels import PYTORCH, Kernels, install
from llmos.weights.load import MODEL_FILES


def test_every_decoder_declares_its_kernels():
    missing = [name for name, cls in MODEL_FILES.items() if vars(cls).get("kernels") is not PYTORCH]
    assert not missing, (f"add `kernels: Kernels = PYTORCH` to the model class of {missing} (models/kernels.py): "
                         "the engine asks every model for a decode step, and attention.plan takes them")


def test_install_reaches_the_model_and_its_int4_layers():
    class Marked(Kernels):
        name = "marked"

    layer = quant.Int4Linear.from_float(torch.randn(64, 64), None)
    model = torch.nn.Sequential(layer)
    install(model, Marked())
    assert model.kernels.name == "marked" and layer.kernels is model.kernels
    assert quant.Int4Linear.kernels is PYTORCH  # the class default is untouched
