"""The Megalodon language model: embedding -> blocks -> final TimestepNorm -> LM head.

One contract for prefill and decode: `forward(tokens, state)` continues every row from wherever its
state stands. Internally the tokens are cut at absolute multiples of chunk_size so that no segment
crosses a chunk boundary; a one-token call over rows at different positions is a single batched
step. Every path -- `forward` (the torch reference), `decode_step` (whatever decode ops the caller
hands it) and `forward_train` -- runs the same layers over a `StepView`; only the `StepOps` differ.
The model chooses no kernels and caches nothing derived from its weights. It knows nothing of
requests, schedulers or tokenizers.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from megalodon_infer.config import ModelConfig
from megalodon_infer.kernels.reference import stat_dtype_for
from megalodon_infer.model.attention import RotaryEmbedding, SegmentOps, StepOps, TrainOps
from megalodon_infer.model.block import MegaBlock
from megalodon_infer.model.norms import TimestepNorm
from megalodon_infer.model.state import MegalodonState, StepView, allocate_state


class OutputLayer(nn.Module):
    """The official `output` module: final TimestepNorm and the (bias-free) LM head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.final_norm = TimestepNorm(cfg.model_dim, cfg.norm_num_groups, cfg.norm_eps)
        self.output = nn.Linear(cfg.model_dim, cfg.effective_output_size, bias=False)


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
        """State tensors for `batch_size` rows on the model's device, every row reset to a fresh request."""
        state = allocate_state(self.config, batch_size, self.dtype, self.stat_dtype, self.device)
        self.reset_rows(state, torch.arange(batch_size, device=self.device))
        return state

    @torch.no_grad()
    def reset_rows(self, state: MegalodonState, rows: Tensor) -> None:
        """Make `rows` [R] of `state` fresh requests: position 0, norm priors, zero CEMA state and KV."""
        rows = rows.to(state.position.device)
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

        The torch reference path, for any split and any mix of positions (it validates its input
        and syncs with the host to cut chunks; the serving decode path is `decode_step`).

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
            slot_ids = torch.arange(B)
        slot_ids = slot_ids.to(state.position.device)
        tokens = tokens.to(self.device)
        if T == 0:
            raise ValueError("tokens must contain at least one token per row")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")

        if T == 1:  # one token never crosses a chunk boundary: rows at any positions form one step
            return self.forward_segment(tokens, state, slot_ids), state
        positions = state.position[slot_ids]
        if bool((positions == positions[0]).all()):
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
        """Rows that all start at `start`: cut at absolute chunk boundaries and run each segment."""
        C = self.config.chunk_size
        T = tokens.shape[1]
        outputs = []
        offset = 0
        while offset < T:
            length = min(C - (start + offset) % C, T - offset)
            is_last = offset + length == T
            head = ("last" if is_last else "none") if last_only else "all"
            logits = self.forward_segment(tokens[:, offset:offset + length], state, slot_ids, logits=head)
            if logits is not None:
                outputs.append(logits)
            offset += length
        return torch.cat(outputs, dim=1)

    @torch.no_grad()
    def forward_segment(self, tokens: Tensor, state: MegalodonState, slot_ids: Tensor, ops: StepOps | None = None,
                        logits: Literal["all", "last", "none"] = "all") -> Tensor | None:
        """One segment per row that does not cross a chunk boundary: (position mod C) + L <= C.

        tokens: [B, L] on the model's device; slot_ids: [B] distinct rows of `state`. `ops` defaults
        to the torch reference (`SegmentOps`). Returns logits [B, L, V] ("all"), [B, 1, V] ("last")
        float32, or None ("none").
        """
        L = tokens.shape[1]
        step = StepView.at(state, slot_ids, L)
        if L > 1 and bool((step.fills + L > self.config.chunk_size).any()):
            raise ValueError("a segment must not cross a chunk boundary")
        x = self._run(tokens, step, ops or SegmentOps())
        if logits == "none":
            return None
        return self.output.output(x[:, -1:] if logits == "last" else x).float()

    @torch.no_grad()
    def decode_step(self, tokens: Tensor, state: MegalodonState, slot_ids: Tensor, ops: StepOps) -> Tensor:
        """One token for each of B rows at any positions: the decode hot path.

        tokens: [B] int64 and slot_ids: [B] int64 (distinct pool rows), on the model's device; `ops`
        are the decode ops (the worker's fused kernels or their reference twins; `SegmentOps()` is the
        same math). Returns logits [B, V] float32 and advances each slot's position by one.
        Validates nothing and reads positions on the device, so with fused ops it never syncs with
        the host and a CUDA graph can capture it.
        """
        x = self._run(tokens[:, None], StepView.at(state, slot_ids, 1), ops)
        return self.output.output(x[:, 0]).float()

    def forward_train(self, tokens: Tensor) -> Tensor:
        """Differentiable forward of whole sequences from a fresh state, for training.

        tokens: [B, T] with T <= chunk_size or a multiple of it. Returns logits [B, T, V] float32.
        Equal to `forward` on a fresh state (tested); it keeps no state and builds no KV.
        """
        B, T = tokens.shape
        C = self.config.chunk_size
        if T > C and T % C:
            raise ValueError(f"training sequences must be shorter than or a multiple of chunk_size, got {T}")
        x = self._run(tokens, StepView.fresh(B, T, C, tokens.device), TrainOps(C))
        return self.output.output(x).float()

    def _run(self, tokens: Tensor, step: StepView, ops: StepOps) -> Tensor:
        """Embedding -> blocks -> final TimestepNorm for one step; advances the rows' positions.

        tokens: [B, L]. Returns the final-normed hidden states [B, L, D].
        """
        x = self.embed(tokens)
        if self.config.scale_emb:
            x = x * math.sqrt(self.config.model_dim)
        for i, layer in enumerate(self.layers):
            x = layer(x, step, i, ops, self.rope)
        x = ops.final_norm(x, step, self.output.final_norm)
        step.advance()
        return x

    # ------------------------------------------------------------------------------ inference setup
    def prepare_for_inference(self, dtype: torch.dtype, device: str | torch.device = "cpu",
                              rope_freqs_bf16: bool = False) -> Megalodon:
        """Apply the dtype policy, move to `device`, eval mode, no grad. Returns self.

        Weights and KV take `dtype`; RoPE inverse frequencies and TimestepNorm priors stay fp32
        (statistics and CEMA math are fp32 whatever the weights are). Decode kernels are the
        worker's choice (`megalodon_infer.worker.decode_ops`), not made here.
        """
        freqs = self.rope.freqs.detach().float().clone()
        self.to(device=device, dtype=dtype)
        self.rope.freqs = freqs.to(self.device)
        self.rope.round_to_bf16 = rope_freqs_bf16
        for norm in [layer.mega.timenorm for layer in self.layers] + [self.output.final_norm]:
            norm.prior_mean = norm.prior_mean.float()
            norm.prior_logv = norm.prior_logv.float()
        return self.eval().requires_grad_(False)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
