"""StatePool: every in-flight sequence's recurrent state, preallocated as slots of one state tensor.

A sequence holds an int (its slot). Slots are allocated once at startup, handed out and taken
back; a freshly allocated slot is reset to a new request's state (or overwritten by a snapshot)
before anything reads it. Knows nothing of requests or scheduling policy.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from megalodon_infer.model.megalodon import Megalodon
from megalodon_infer.model.state import MegalodonState, slot_bytes


class PoolMemoryError(ValueError):
    """The requested pool does not fit the memory limit it was given."""


@dataclass(frozen=True)
class SlotSnapshot:
    """An immutable copy of one sequence's state (a value: restoring it never changes it).

    position: tokens processed; norm_mean/norm_var [Lyr+1, G]; cema_h [Lyr, D, N] complex;
    keys [Lyr, fill, H, dz] and values [Lyr, fill, H, dv]: only the current chunk's entries, so a
    snapshot taken at a chunk boundary holds no KV at all.
    """

    position: int
    norm_mean: Tensor
    norm_var: Tensor
    cema_h: Tensor
    keys: Tensor
    values: Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values()) + 8

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "position"}

    def to(self, device: torch.device | str) -> SlotSnapshot:
        moved = {name: t.to(device) for name, t in self.tensors().items()}
        return SlotSnapshot(position=self.position, **moved)


class StatePool:
    """`max_num_seqs` slots of Megalodon state on the model's device."""

    def __init__(self, model: Megalodon, max_num_seqs: int, memory_limit_bytes: int | None = None,
                 reserve_pad_slot: bool = False) -> None:
        """`reserve_pad_slot` adds one row that is never handed out (`pad_slot`): CUDA graphs point the
        padding rows of a batch-size bucket at it."""
        self.model = model
        self.chunk_size = model.config.chunk_size
        per_slot = slot_bytes(model.config, model.dtype, model.stat_dtype)
        if memory_limit_bytes is not None and per_slot * max_num_seqs > memory_limit_bytes:
            fits = memory_limit_bytes // per_slot
            raise PoolMemoryError(
                f"{max_num_seqs} state slots need {per_slot * max_num_seqs:,} bytes ({per_slot:,} per slot) but "
                f"the memory limit is {memory_limit_bytes:,} bytes: at most {fits} slots would fit")
        rows = max_num_seqs + int(reserve_pad_slot)
        self.state: MegalodonState = model.allocate_state(rows)
        self.num_slots = max_num_seqs
        self.pad_slot: int | None = max_num_seqs if reserve_pad_slot else None
        self.bytes_per_slot = self.state.nbytes() // rows
        self._free: list[int] = list(range(max_num_seqs - 1, -1, -1))  # pop() hands out low ids first
        self._in_use: set[int] = set()

    @property
    def total_bytes(self) -> int:
        return self.state.nbytes()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of slots in use (vLLM's cache usage gauge, for state slots)."""
        return len(self._in_use) / self.num_slots

    def can_alloc(self, num_slots: int = 1) -> bool:
        return len(self._free) >= num_slots

    def alloc(self) -> int:
        """A slot holding a fresh request's state (position 0, norm priors, zero CEMA state)."""
        if not self._free:
            raise RuntimeError("no free state slot (the scheduler must check can_alloc first)")
        slot = self._free.pop()
        self._in_use.add(slot)
        self.model.reset_rows(self.state, torch.tensor([slot], device=self.model.device))
        return slot

    def free(self, slot: int) -> None:
        if slot not in self._in_use:
            raise RuntimeError(f"slot {slot} is not allocated")
        self._in_use.remove(slot)
        self._free.append(slot)

    @torch.no_grad()
    def snapshot(self, slot: int, position: int | None = None) -> SlotSnapshot:
        """Copy slot `slot` into an immutable value (KV trimmed to the current chunk's fill).

        `position`: the tokens the slot has processed, when the caller knows it (saves reading it
        back from the device, a host sync on a GPU).
        """
        st = self.state
        if position is None:
            position = int(st.position[slot])
        fill = position % self.chunk_size
        return SlotSnapshot(
            position=position,
            norm_mean=st.norm_mean[:, slot].clone(),
            norm_var=st.norm_var[:, slot].clone(),
            cema_h=st.cema_h[:, slot].clone(),
            keys=st.keys[:, slot, :fill].clone(),
            values=st.values[:, slot, :fill].clone(),
        )

    @torch.no_grad()
    def restore(self, snapshot: SlotSnapshot, slot: int) -> None:
        """Overwrite slot `slot` with `snapshot` (the snapshot itself is only read)."""
        if slot not in self._in_use:
            raise RuntimeError(f"slot {slot} is not allocated")
        st = self.state
        fill = snapshot.keys.shape[1]
        if fill != snapshot.position % self.chunk_size:
            raise ValueError("snapshot KV length does not match its position")
        st.position[slot] = snapshot.position
        st.norm_mean[:, slot] = snapshot.norm_mean
        st.norm_var[:, slot] = snapshot.norm_var
        st.cema_h[:, slot] = snapshot.cema_h
        st.keys[:, slot, :fill] = snapshot.keys
        st.values[:, slot, :fill] = snapshot.values

    @torch.no_grad()
    def copy_slot(self, src: int, dst: int, position: int | None = None) -> None:
        """Make `dst` continue exactly where `src` stands (n > 1 choices share one prefill)."""
        self.restore(self.snapshot(src, position), dst)

    def snapshot_mismatch(self, snapshot: SlotSnapshot) -> str | None:
        """Why `snapshot` cannot be restored into this pool's slots (None: it fits). Reads only the
        pool's shapes and dtypes, never a slot, so any thread may ask."""
        layout = {name: (t.shape[:1] + t.shape[2:], t.dtype) for name, t in self.state.tensors().items()}
        for name, tensor in snapshot.tensors().items():
            shape, dtype = layout[name]
            if name in ("keys", "values"):  # [Lyr, fill, H, d]: any fill up to C - 1
                ok = tensor.shape[:1] + tensor.shape[2:] == shape[:1] + shape[2:] and tensor.shape[1] < shape[1]
            else:
                ok = tensor.shape == shape
            if not ok or tensor.dtype != dtype:
                return f"{name} {tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"
        return None
