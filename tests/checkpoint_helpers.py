"""Helpers for the checkpoint tests (loading, CLI convert): writable copies of the official fixture
and model-parallel shards split along the official axes."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from megalodon_infer.model.loading import shard_merge_axis


def logits_of(model, n: int = 40, seed: int = 0) -> torch.Tensor:
    """Logits [1, n, V] of a fixed random prompt from a fresh state."""
    tokens = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))
    return model(tokens, model.allocate_state(1))[0]


def copy_official(parity_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of the official-format fixture (shared/ is read-only)."""
    dst = tmp_path / "official"
    shutil.copytree(parity_dir, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    dst.chmod(0o755)
    return dst


def split_into_shards(sd: dict[str, torch.Tensor], num_shards: int) -> list[dict[str, torch.Tensor]]:
    """Model-parallel state dicts, rank order, split along the official merge axes."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    for key, tensor in sd.items():
        axis = shard_merge_axis(key)
        parts = [tensor] * num_shards if axis is None else torch.chunk(tensor, num_shards, dim=axis)
        for shard, part in zip(shards, parts, strict=True):
            shard[key] = part.clone()
    return shards


def write_shards(ckpt: Path, num_shards: int) -> None:
    """Replace consolidated.pth by consolidated.NN.pth shards."""
    sd = torch.load(ckpt / "consolidated.pth", weights_only=True)
    (ckpt / "consolidated.pth").unlink()
    for rank, shard in enumerate(split_into_shards(sd, num_shards)):
        torch.save(shard, ckpt / f"consolidated.{rank:02d}.pth")
