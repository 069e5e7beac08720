"""The exportable generator: the training modules reused as they are, with the trained prior's
CDF table baked in as a constant. ``u`` in, ``(images uint8 NHWC, mean fp32 NHWC)`` out."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from training.images import to_uint8_nhwc
from training.model import KAEM


class ServedGenerator(nn.Module):
    """One forward pass: sanitize u → ITS on the constant CDF table → decoder → sigmoid → uint8.

    Eager sampling (``training.sample``) runs the very same ``KAEM.generate`` with the same table,
    so eager, onnxruntime and Triton agree."""

    def __init__(self, model: KAEM):
        super().__init__()
        self.model = model.eval()
        with torch.no_grad():
            self.register_buffer("cdf", model.prior.cdf_table().detach().clone())

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        mean = self.model.generate(u, self.cdf)
        return to_uint8_nhwc(mean), mean.permute(0, 2, 3, 1)
