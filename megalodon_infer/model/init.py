"""Weight initialisation: the official scheme (for training our demo model and for benchmarks), and
a fully randomised variant for tests, where nothing may hide behind a zero-initialised offset.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megalodon_infer.config import ModelConfig
from megalodon_infer.model.megalodon import Megalodon


@torch.no_grad()
def init_weights(model: Megalodon, seed: int = 0, randomize_all: bool = False) -> Megalodon:
    """Initialise `model` in place, deterministically from `seed`.

    Official (spec 2.2 and 7.10): projections N(0, 1/sqrt(3 fan_in)) with zero biases; embedding
    and head truncated N(0, 1/sqrt(D)); CEMA alpha, delta ~ N(0, 0.2), theta = logit of
    exp(-k ln D / D) permuted over channels, gamma ~ N(0, 1) with zero imaginary part, omega ~
    truncated N(0, 0.25); every "+1" norm offset and the Q/K affine zero.
    `randomize_all` additionally draws every offset, bias and the imaginary gamma at random.
    """
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    D = cfg.model_dim

    def normal_(t: torch.Tensor, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=g) * std)

    def trunc_normal_(t: torch.Tensor, std: float, bound: float) -> None:
        t.copy_((torch.randn(t.shape, generator=g) * std).clamp(-bound, bound))

    trunc_normal_(model.embed.weight, 1.0 / math.sqrt(D), 3.0 / math.sqrt(D))
    if not cfg.share_emb:
        trunc_normal_(model.output.output.weight, 1.0 / math.sqrt(D), 3.0 / math.sqrt(D))
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not model.output.output:
            normal_(module.weight, 1.0 / math.sqrt(3.0 * module.in_features))
            if module.bias is not None:
                module.bias.zero_()
    for layer in model.layers:
        cema = layer.mega.cema
        normal_(cema.alpha, 0.2)
        normal_(cema.delta, 0.2)
        freqs = torch.exp(-torch.arange(1, D + 1, dtype=torch.float64) * math.log(D) / D)
        freqs = freqs.clamp(1e-6, 1 - 1e-6)[torch.randperm(D, generator=g)]
        cema.theta.copy_(torch.logit(freqs).float().view(D, 1, 1))
        normal_(cema.gamma, 1.0)
        cema.gamma[..., 1] = 0.0
        trunc_normal_(cema.omega, 0.25, 1.0)
    if randomize_all:
        _randomize_offsets(model, g)
    return model


def _randomize_offsets(model: Megalodon, g: torch.Generator) -> None:
    """Draw every parameter the official init leaves at zero, so tests exercise all of them."""
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("cema.gamma"):
            param[..., 1] = torch.randn(param[..., 1].shape, generator=g)
        elif leaf in ("weight", "bias") and ("norm" in name or name.endswith("bias")):
            param.copy_(torch.randn(param.shape, generator=g) * 0.25)
        elif name.endswith("mega.gamma"):
            param.copy_(torch.randn(param.shape, generator=g) * 0.8)
        elif name.endswith("mega.beta"):
            param.copy_(torch.randn(param.shape, generator=g) * 0.4)
        elif name.endswith("nffn.alpha"):
            param.copy_(torch.rand(param.shape, generator=g) + 0.5)


def random_model(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 randomize_all: bool = True) -> Megalodon:
    """A Megalodon with random weights in the given dtype (tests, benchmarks)."""
    model = Megalodon(cfg)
    init_weights(model, seed=seed, randomize_all=randomize_all)
    return model.prepare_for_inference(dtype, device)
