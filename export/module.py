"""The exportable generator: the training modules reused as they are, with the trained prior's
CDF table baked in as a constant. ``u`` in, ``(images uint8 NHWC, mean fp32 NHWC)`` out."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from export.contract import PRECISIONS
from training.errors import KaemError
from training.model.decoder import KANDecoder
from training.model.kaem import KAEM, nhwc, to_uint8_nhwc
from training.model.prior import BucketLookup


class ExportError(KaemError):
    """An export that cannot be made or failed a check (an unsupported precision, a parity failure, ...)."""


class ServedGenerator(nn.Module):
    """One forward pass: sanitize u → ITS on the constant CDF table → decoder → sigmoid → uint8.

    The table is baked with its :class:`BucketLookup` (O(1) per coordinate; the same index as the
    binary search of eager sampling, ``training.sample``), so eager, onnxruntime and Triton agree.
    The decoder's spline matrices are baked too, with rows in the k-major order of KANLayer.forward_kmajor
    (onnxruntime's faster broadcast; the same sums as eager decoding, added in another order: within one grey
    level); ``precision="fp16"``: in half precision, for GPUs, never the seed -> same image guarantee."""

    def __init__(self, model: KAEM, precision: str = "fp32"):
        super().__init__()
        if precision not in PRECISIONS:
            raise ExportError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.model = model.eval()
        self.precision = precision
        kan = isinstance(model.decoder, KANDecoder)
        if precision != "fp32" and not kan:
            raise ExportError(f"a {precision} export needs the KAN decoder, not {type(model.decoder).__name__}")
        dtype = torch.float16 if precision == "fp16" else torch.float32
        with torch.no_grad():
            self.lookup = BucketLookup(model.prior.cdf_table(), model.prior.knots)
            self.n_weights = len(model.decoder.layers) if kan else 0
            for i in range(self.n_weights):
                self.register_buffer(f"weight{i}",
                                     model.decoder.layers[i].weight(kmajor=True).detach().to(dtype).clone())

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        h = self.model.latent_of_u(u, lookup=self.lookup)
        if self.n_weights:
            logits = self.model.decoder(h, [getattr(self, f"weight{i}") for i in range(self.n_weights)], kmajor=True)
        else:
            logits = self.model.decoder(h)
        mean = torch.sigmoid(logits)
        return to_uint8_nhwc(mean), nhwc(mean)
