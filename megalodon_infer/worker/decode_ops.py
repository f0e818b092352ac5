"""The decode ops: the decode kernels chosen once, bound to the weights they need, built once.

Owns the one choice between the fused csrc/ kernels and their torch reference twins (through
`kernels.dispatch`, with the mode passed in: "auto" | "reference" | "fused"), and the weights derived
from the model for them (per layer the TimestepNorm affine and the CEMA coefficients, plus the final
norm's), computed with host syncs here so that no decode step, and no CUDA graph capture, has to.
`DecodeOps` is the `StepOps` the model's `decode_step` runs: one token per row, every row at its own
position. Knows nothing of requests or scheduling.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from megalodon_infer.kernels.decode import CemaWeights, TsnWeights
from megalodon_infer.kernels.dispatch import DecodeKernels, select_decode_kernels
from megalodon_infer.model.cema import CEMA
from megalodon_infer.model.megalodon import Megalodon
from megalodon_infer.model.norms import TimestepNorm
from megalodon_infer.model.state import StepView

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class DecodeOps:
    """`StepOps` for one-token steps through `kernels`, with the model's derived weights.

    layers: per layer (TimestepNorm, CEMA) weights in the kernels' form; final: the final norm's.
    The weights are a snapshot of the model when the ops were built: rebuild after changing the
    weights, dtype or device. The norm and CEMA modules the model passes in are not read.
    """

    kernels: DecodeKernels
    layers: tuple[tuple[TsnWeights, CemaWeights], ...]
    final: TsnWeights

    @property
    def name(self) -> str:
        """"fused" or "reference"."""
        return self.kernels.name

    @property
    def is_fused(self) -> bool:
        return self.kernels.is_fused

    def tsn_cema(self, x: Tensor, step: StepView, layer: int, norm: TimestepNorm, cema: CEMA
                 ) -> tuple[Tensor, Tensor]:
        """x: [B, 1, D] -> (x_hat, CEMA output) [B, 1, D]; the layer's statistics and CEMA state advance."""
        assert x.shape[1] == 1, "decode ops run one token per row"
        pool, (tsn, cema_weights) = step.layer(layer), self.layers[layer]
        x_hat, y = self.kernels.tsn_cema_step(x[:, 0], step.slot_ids, step.pool_position, pool.mean, pool.var,
                                              pool.cema_h, tsn, cema_weights)
        return x_hat[:, None], y[:, None]

    def attention(self, q: Tensor, k: Tensor, v: Tensor, step: StepView, layer: int) -> Tensor:
        """q, k: [B, 1, H, dz]; v: [B, 1, H, dv] -> [B, 1, H * dv]; appends k/v at each slot's fill."""
        pool = step.layer(layer)
        out = self.kernels.attention_decode(q[:, 0], k[:, 0].to(pool.keys.dtype), v[:, 0].to(pool.values.dtype),
                                            pool.keys, pool.values, step.slot_ids, step.pool_position)
        return out[:, None]

    def final_norm(self, x: Tensor, step: StepView, norm: TimestepNorm) -> Tensor:
        """x: [B, 1, D] -> [B, 1, D]; the final norm's statistics advance."""
        mean, var = step.final_norm_stats()
        return self.kernels.final_norm_step(x[:, 0], step.slot_ids, step.pool_position, mean, var,
                                            self.final)[:, None]


def build_decode_ops(model: Megalodon, kv_dtype: torch.dtype | None = None, mode: str = "auto") -> DecodeOps:
    """Choose the decode kernels for `model` (K/V stored in `kv_dtype`, default the model dtype) under
    `mode`, build their weights, and log the choice. Raises ValueError for an unknown mode, and for
    "fused" where the kernels cannot run (ExtensionBuildError when they do not build)."""
    kv_dtype = kv_dtype or model.dtype
    kernels = select_decode_kernels(model.device, model.dtype, kv_dtype, mode)
    sd = model.stat_dtype
    with torch.no_grad():
        layers = tuple((TsnWeights.from_module(layer.mega.timenorm, sd), CemaWeights.from_module(layer.mega.cema, sd))
                       for layer in model.layers)
        final = TsnWeights.from_module(model.output.final_norm, sd)
    logger.info("decode ops: %s on %s, %s activations, %s K/V (%s)", kernels.name, model.device,
                str(model.dtype).removeprefix("torch."), str(kv_dtype).removeprefix("torch."), kernels.reason)
    return DecodeOps(kernels, layers, final)
