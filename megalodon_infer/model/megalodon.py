"""The Megalodon language model: embedding -> blocks -> final TimestepNorm -> LM head.

One contract for prefill and decode: `forward(tokens, state)` continues every row from wherever its
state stands. Internally the tokens are cut at absolute multiples of chunk_size so that no segment
crosses a chunk boundary; a one-token call over rows at different positions is a single batched
step. The model knows nothing of requests, schedulers or tokenizers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..kernels.decode import CemaWeights, TsnWeights
from ..kernels.dispatch import DecodeKernels, requested_mode, select_decode_kernels
from ..kernels.reference import stat_dtype_for
from .attention import LayerState, RotaryEmbedding
from .block import MegaBlock
from .norms import TimestepNorm
from .state import MegalodonState, allocate_state


class OutputLayer(nn.Module):
    """The official `output` module: final TimestepNorm and the (bias-free) LM head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.final_norm = TimestepNorm(cfg.model_dim, cfg.norm_num_groups, cfg.norm_eps)
        self.output = nn.Linear(cfg.model_dim, cfg.effective_output_size, bias=False)


@dataclass(frozen=True, eq=False)
class DecodeWeights:
    """Per-layer TimestepNorm and CEMA weights in the form the decode ops take (computed once)."""

    layers: list[tuple[TsnWeights, CemaWeights]]
    final: TsnWeights


class Megalodon(nn.Module):
    """Module and parameter names match the official state-dict keys one to one."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.rope = RotaryEmbedding(cfg.head_z_dim, cfg.effective_rope_base)
        self.layers = nn.ModuleList(MegaBlock(cfg, i) for i in range(cfg.num_layers))
        self.output = OutputLayer(cfg)
        if cfg.share_emb:
            self.output.output.weight = self.embed.weight
        self._kernels_mode: str | None = None
        self._decode_kernels: dict[torch.dtype, DecodeKernels] = {}
        self._decode_weights: DecodeWeights | None = None

    # ----------------------------------------------------------------------------------- state
    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def stat_dtype(self) -> torch.dtype:
        return stat_dtype_for(self.dtype)

    def allocate_state(self, batch_size: int) -> MegalodonState:
        """State tensors for `batch_size` rows, every row reset to a fresh request."""
        state = allocate_state(self.config, batch_size, self.dtype, self.stat_dtype, self.device)
        self.reset_rows(state, torch.arange(batch_size, device=self.device))
        return state

    def init_state(self, batch_size: int = 1) -> MegalodonState:
        """A fresh state for `batch_size` new requests (position 0, priors, no KV)."""
        return self.allocate_state(batch_size)

    @torch.no_grad()
    def reset_rows(self, state: MegalodonState, rows: Tensor) -> None:
        """Make `rows` [R] of `state` fresh requests: position 0, norm priors, zero CEMA state and KV."""
        norms = [layer.mega.timenorm for layer in self.layers] + [self.output.final_norm]
        for i, norm in enumerate(norms):
            mean, var = norm.initial_stats(len(rows), state.norm_mean.dtype)
            state.norm_mean[i, rows] = mean
            state.norm_var[i, rows] = var
        state.position[rows] = 0
        state.cema_h[:, rows] = 0
        # NOTE: zeroing KV is not needed for correctness (entries >= fill are never read) but keeps
        # a fresh slot free of another request's data.
        state.keys[:, rows] = 0
        state.values[:, rows] = 0

    # --------------------------------------------------------------------------------- forward
    @torch.no_grad()
    def forward(
        self,
        tokens: Tensor,
        state: MegalodonState,
        slot_ids: Tensor | None = None,
        last_only: bool = False,
    ) -> tuple[Tensor, MegalodonState]:
        """Run `tokens` on from each row's state; the state is updated in place and returned.

        Args:
            tokens: [B, T] int64 token ids.
            state: a state with at least B rows.
            slot_ids: [B] rows of `state` to use (default: rows 0..B-1).
            last_only: return only the last position's logits ([B, 1, V]), skipping the LM head
                elsewhere (what a server needs for prefill).
        Returns:
            logits [B, T, V] float32 (or [B, 1, V]), and `state`.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        if slot_ids is None:
            if B > state.batch_size:
                raise ValueError(f"state has {state.batch_size} rows but tokens have batch {B}")
            slot_ids = torch.arange(B, device=self.device)
        slot_ids = slot_ids.to(self.device)
        tokens = tokens.to(self.device)
        if T == 0:
            raise ValueError("tokens must contain at least one token per row")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")

        positions = state.position[slot_ids]
        if T == 1 or bool((positions == positions[0]).all()):
            logits = self._forward_aligned(tokens, state, slot_ids, int(positions[0]), last_only)
        else:
            # Rows at different positions cut their chunks at different places: run each alone.
            logits = torch.cat([
                self._forward_aligned(tokens[b:b + 1], state, slot_ids[b:b + 1], int(positions[b]), last_only)
                for b in range(B)
            ])
        return logits, state

    def _forward_aligned(self, tokens: Tensor, state: MegalodonState, slot_ids: Tensor, start: int,
                         last_only: bool) -> Tensor:
        """Rows that all start at `start` (or T == 1): cut at absolute chunk boundaries and run."""
        C = self.config.chunk_size
        T = tokens.shape[1]
        outputs = []
        offset = 0
        while offset < T:
            room = T - offset if T == 1 else C - (start + offset) % C
            length = min(room, T - offset)
            is_last = offset + length == T
            logits = self.forward_segment(tokens[:, offset:offset + length], state, slot_ids,
                                          compute_logits=not last_only or is_last)
            if logits is not None:
                outputs.append(logits[:, -1:] if last_only else logits)
            offset += length
        return torch.cat(outputs, dim=1)

    def forward_segment(self, tokens: Tensor, state: MegalodonState, slot_ids: Tensor,
                        compute_logits: bool = True) -> Tensor | None:
        """One segment per row that does not cross a chunk boundary: (position mod C) + L <= C.

        tokens: [B, L]; slot_ids: [B]. Returns logits [B, L, V] float32 (None if not computed).
        """
        cfg = self.config
        B, L = tokens.shape
        if L == 1:  # a one-token segment never crosses a boundary: the decode hot path
            logits = self.decode_step(tokens[:, 0], state, slot_ids)
            return logits[:, None] if compute_logits else None
        count0 = state.position[slot_ids]  # [B]
        fills = count0 % cfg.chunk_size
        if bool((fills + L > cfg.chunk_size).any()):
            raise ValueError("a segment must not cross a chunk boundary")
        x = self.embed(tokens)
        if cfg.scale_emb:
            x = x * math.sqrt(cfg.model_dim)
        for i, layer in enumerate(self.layers):
            st = LayerState(state.norm_mean[i, slot_ids], state.norm_var[i, slot_ids],
                            state.cema_h[i, slot_ids], state.keys[i], state.values[i], slot_ids)
            x = layer(x, count0, fills, st, self.rope)
            state.norm_mean[i, slot_ids] = st.mean
            state.norm_var[i, slot_ids] = st.var
            state.cema_h[i, slot_ids] = st.cema_h
        final = self.output.final_norm
        Lyr = cfg.num_layers
        x, mean, var = final(x, count0, state.norm_mean[Lyr, slot_ids], state.norm_var[Lyr, slot_ids])
        state.norm_mean[Lyr, slot_ids] = mean
        state.norm_var[Lyr, slot_ids] = var
        state.position[slot_ids] = count0 + L
        if not compute_logits:
            return None
        return self.output.output(x).float()

    @torch.no_grad()
    def decode_step(self, tokens: Tensor, state: MegalodonState, slot_ids: Tensor) -> Tensor:
        """One token for each of B rows at any positions: the decode hot path.

        tokens: [B] int64 and slot_ids: [B] int64 (distinct pool rows), on the model's device.
        Returns logits [B, V] float32 and advances each slot's position by one. Validates nothing;
        with fused kernels it never syncs with the host, so a CUDA graph can capture it (the
        decode weights must exist first: `decode_weights()` outside the capture).
        """
        cfg = self.config
        kernels = self.decode_kernels(state.keys.dtype)
        weights = self.decode_weights()
        x = self.embed(tokens)  # [B, D]
        if cfg.scale_emb:
            x = x * math.sqrt(cfg.model_dim)
        for i, layer in enumerate(self.layers):
            tsn, cema = weights.layers[i]
            y = layer.mega.decode_step(x, state, i, slot_ids, self.rope, kernels, tsn, cema)
            x = layer.nffn(y, residual=x)
        Lyr = cfg.num_layers
        x = kernels.final_norm_step(x, slot_ids, state.position, state.norm_mean[Lyr], state.norm_var[Lyr],
                                    weights.final)
        state.position[slot_ids] += 1
        return self.output.output(x).float()

    # ------------------------------------------------------------------------------ decode kernels
    def set_decode_kernels(self, mode: str | None = None) -> DecodeKernels:
        """Choose the decode implementation: "auto", "reference", "fused", or None for $MEGALODON_KERNELS.

        Returns (and logs, once) what the model's dtype gets now; the choice is kept until the next call.
        """
        self._kernels_mode = None if mode is None else requested_mode(mode)
        self._decode_kernels = {}
        return self.decode_kernels()

    def decode_kernels(self, kv_dtype: torch.dtype | None = None) -> DecodeKernels:
        """The decode ops for this model with K/V stored in `kv_dtype` (default: the model dtype)."""
        kv_dtype = kv_dtype or self.dtype
        kernels = self._decode_kernels.get(kv_dtype)
        if kernels is None:
            kernels = select_decode_kernels(self.device, self.dtype, kv_dtype, self._kernels_mode)
            self._decode_kernels[kv_dtype] = kernels
        return kernels

    @property
    def decode_backend(self) -> str:
        """"fused" or "reference": what `decode_step` runs for the model dtype's K/V."""
        return self.decode_kernels().name

    def decode_weights(self) -> DecodeWeights:
        """TimestepNorm affines and CEMA coefficients for the decode ops, computed once and cached."""
        if self._decode_weights is None:
            sd = self.stat_dtype
            with torch.no_grad():
                layers = [(TsnWeights.from_module(layer.mega.timenorm, sd),
                           CemaWeights.from_module(layer.mega.cema, sd)) for layer in self.layers]
                self._decode_weights = DecodeWeights(layers, TsnWeights.from_module(self.output.final_norm, sd))
        return self._decode_weights

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module hook signature
        # A dtype or device move changes which kernels apply and invalidates the derived weights.
        self._decode_kernels = {}
        self._decode_weights = None
        return super()._apply(fn, recurse)

    def prepare_for_inference(self, dtype: torch.dtype, device: str | torch.device = "cpu",
                              rope_freqs_bf16: bool = False) -> Megalodon:
        """Apply the dtype policy, move to `device`, eval mode, no grad. Returns self.

        Weights and KV take `dtype`; RoPE inverse frequencies and TimestepNorm priors stay fp32
        (statistics and CEMA math are fp32 whatever the weights are).
        """
        freqs = self.rope.freqs.detach().float().clone()
        self.to(device=device, dtype=dtype)
        self.rope.freqs = freqs.to(self.device)
        self.rope.round_to_bf16 = rope_freqs_bf16
        for norm in [layer.mega.timenorm for layer in self.layers] + [self.output.final_norm]:
            norm.prior_mean = norm.prior_mean.float()
            norm.prior_logv = norm.prior_logv.float()
        self.invalidate_caches()
        self.decode_kernels()  # resolve (and build) the decode kernels now, not on the first request
        return self.eval().requires_grad_(False)

    def forward_train(self, tokens: Tensor) -> Tensor:
        """Differentiable forward of whole sequences from a fresh state, for training.

        tokens: [B, T] with T <= chunk_size or a multiple of it. Returns logits [B, T, V] float32.
        Equal to `forward` on a fresh state (tested); it keeps no state and builds no KV.
        """
        cfg = self.config
        x = self.embed(tokens)
        if cfg.scale_emb:
            x = x * math.sqrt(cfg.model_dim)
        for layer in self.layers:
            x = layer.forward_train(x, self.rope)
        B = tokens.shape[0]
        mean0, var0 = self.output.final_norm.initial_stats(B, self.stat_dtype)
        fresh = torch.zeros(B, dtype=torch.int64, device=tokens.device)
        x, _, _ = self.output.final_norm(x, fresh, mean0, var0)
        return self.output.output(x).float()

    def invalidate_caches(self) -> None:
        """Drop cached derived values (CEMA coefficients) after the weights change."""
        for layer in self.layers:
            layer.mega.cema.invalidate_cache()
        self._decode_weights = None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
