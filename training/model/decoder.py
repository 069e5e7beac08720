"""Decoders g_Φ(h) (docs/design.md §1.3, §6): the KAN decoder of the MNIST/FMNIST configs and the
transposed-convolution stacks of the colour configs. Both return pre-sigmoid logits [B, C, H, W].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor, nn

from training.config import DecoderConfig
from training.model.kan import KANLayer

M = TypeVar("M", bound=nn.Module)


class KANDecoder(nn.Module):
    """Q → hidden… → C·H·W KAN layers; the RBF grids are refitted from propagated latents."""

    def __init__(self, cfg: DecoderConfig, Q: int, gen: torch.Generator):
        super().__init__()
        self.image_shape = cfg.image_shape
        widths = (Q, *cfg.hidden, math.prod(cfg.image_shape))
        self.layers = nn.ModuleList(
            KANLayer(i, o, cfg.basis, cfg.grid_size, cfg.grid_range, cfg.base_act, gen)
            for i, o in zip(widths[:-1], widths[1:], strict=True)
        )

    def forward(self, h: Tensor, weights: list[Tensor] | None = None, kmajor: bool = False) -> Tensor:
        """``weights``: each layer's precomputed KANLayer.weight; ``kmajor``: they are ``weight(kmajor=True)`` and
        the layers run KANLayer.forward_kmajor (the served graph)."""
        x = h
        for i, layer in enumerate(self.layers):
            w = None if weights is None else weights[i]
            x = layer.forward_kmajor(x, w) if kmajor else layer(x, w)
        return x.view(-1, *self.image_shape)

    def frozen(self) -> Callable[[Tensor], Tensor]:
        """This decoder with its current weights detached and each layer's spline matrix built once: for
        the many decodes of one training step that need no parameter gradient (importance weights,
        Langevin targets), where rebuilding the matrices was a fifth of the step. A decode that records no
        graph (h needs no gradient: the screening of 3,000 proposals) computes the RBF basis in place
        (KANLayer.forward_), the same numbers bit for bit: its [3000, 82, 21] values (20 MB, past the caches)
        were four such buffers, and that decode took 74 ms against 58 ms in place (interleaved, docs/design.md
        §11.10)."""
        with torch.no_grad():
            weights = [layer.weight() for layer in self.layers]

        def decode(h: Tensor) -> Tensor:
            if torch.is_grad_enabled() and h.requires_grad:  # Langevin targets: gradients in h
                return self.forward(h, weights)
            with torch.no_grad():
                x = h
                for layer, w in zip(self.layers, weights, strict=True):
                    x = layer.forward_(x, w)
            return x.view(-1, *self.image_shape)

        return decode

    @torch.no_grad()
    def refit_grid(self, h: Tensor) -> None:
        """Refit each layer's grid to the inputs it sees for these latents (docs/design.md §2.3)."""
        x = h
        for layer in self.layers:
            layer.refit_grid(x)
            x = layer(x)


class ConvDecoder(nn.Module):
    """1×1×Q → ConvTranspose stack → C channels. ``hidden_act`` (LeakyReLU(0.2) by default) sits
    between layers; ``reference_linear`` drops it, matching the reference code exactly (docs/design.md §6:
    its CNN is a linear map followed by a sigmoid, almost certainly unintended)."""

    def __init__(self, cfg: DecoderConfig, Q: int):
        super().__init__()
        chans = (Q, *cfg.channels, cfg.image_shape[0])
        mods: list[nn.Module] = []
        for i, (k, s, p) in enumerate(cfg.layers):
            mods.append(nn.ConvTranspose2d(chans[i], chans[i + 1], k, s, p))
            if i < len(cfg.layers) - 1 and not cfg.reference_linear:
                mods.append(nn.LeakyReLU(0.2) if cfg.hidden_act == "leaky_relu" else nn.GELU())
        self.net = nn.Sequential(*mods)
        self.image_shape = cfg.image_shape

    def forward(self, h: Tensor) -> Tensor:
        out = self.net(h.view(h.shape[0], -1, 1, 1))
        if tuple(out.shape[1:]) != tuple(self.image_shape):
            raise ValueError(f"conv decoder produces {tuple(out.shape[1:])}, config says {self.image_shape}")
        return out

    def refit_grid(self, h: Tensor) -> None:
        """Conv decoders have no grid."""

    def frozen(self) -> Callable[[Tensor], Tensor]:
        """Nothing to precompute: the decoder itself (callers ask only for input gradients)."""
        return self.forward


def child_seed(gen: torch.Generator) -> int:
    """One seed drawn from ``gen`` for a module built with PyTorch's default init (:func:`seeded_build`)."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=gen))


def seeded_build(seed: int, build: Callable[[], M]) -> M:
    """``build()`` under PyTorch's default init seeded with ``seed``, leaving the caller's global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_decoder(cfg: DecoderConfig, Q: int, gen: torch.Generator) -> nn.Module:
    if cfg.kind == "kan":
        return KANDecoder(cfg, Q, gen)
    return seeded_build(child_seed(gen), lambda: ConvDecoder(cfg, Q))
