"""Checkpoint formats: official (single and model-parallel shards), ours, and every bad case."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoint_helpers import copy_official, logits_of, split_into_shards, write_shards

from megalodon_infer import CheckpointError, ModelConfig, load_model, save_model
from megalodon_infer.model.init import random_model
from megalodon_infer.model.loading import merge_shards


def test_safetensors_round_trip_gives_identical_logits(parity_dir, tmp_path):
    model = load_model(parity_dir)
    save_model(model, tmp_path / "ours")
    assert (tmp_path / "ours" / "model.safetensors").exists()
    again = load_model(tmp_path / "ours")
    assert torch.equal(logits_of(model), logits_of(again))


@pytest.mark.parametrize("share_emb", [False, True])
def test_round_trip_of_every_embedding_option(tmp_path, share_emb):
    cfg = ModelConfig(num_layers=2, model_dim=32, z_dim=16, value_dim=32, num_heads=2, ffn_hidden_dim=40,
                      cema_ndim=3, chunk_size=8, norm_num_groups=4, vocab_size=50, swiglu=True,
                      rescale_nffn=True, scale_emb=True, share_emb=share_emb)
    model = random_model(cfg, seed=4)
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert torch.equal(logits_of(model), logits_of(again))
    if share_emb:
        assert again.output.output.weight is again.embed.weight


@pytest.mark.parametrize("num_shards", [2, 4])
def test_model_parallel_shards_merge_to_the_same_model(parity_dir, tmp_path, num_shards):
    ckpt = copy_official(parity_dir, tmp_path)
    write_shards(ckpt, num_shards)
    merged = load_model(ckpt)
    assert torch.equal(logits_of(merged), logits_of(load_model(parity_dir)))


def test_merge_rejects_disagreeing_replicated_keys(parity_dir):
    sd = torch.load(parity_dir / "consolidated.pth", weights_only=True)
    shards = split_into_shards(sd, 2)
    shards[1]["rope.freqs"] = shards[1]["rope.freqs"] + 1
    with pytest.raises(CheckpointError, match="rope.freqs"):
        merge_shards(shards)


def test_bfloat16_weights_with_fp32_rope_and_state(parity_dir):
    model = load_model(parity_dir, dtype="bfloat16", rope_freqs_bf16=True)
    assert model.embed.weight.dtype == torch.bfloat16
    assert model.rope.freqs.dtype == torch.float32 and model.rope.round_to_bf16
    state = model.allocate_state(2)
    assert state.norm_var.dtype == torch.float32


@pytest.mark.parametrize("mutate,needle", [
    (lambda sd: sd.pop("layers.1.mega.wz.bias"), "missing key 'layers.1.mega.wz.bias'"),
    (lambda sd: sd.__setitem__("layers.0.mega.extra", torch.zeros(1)), "unexpected key 'layers.0.mega.extra'"),
    (lambda sd: sd.__setitem__("layers.0.mega.cema.alpha", torch.zeros(64, 5, 1)),
     r"key 'layers.0.mega.cema.alpha' has shape \(64, 5, 1\), expected \(64, 4, 1\)"),
])
def test_bad_state_dicts_name_the_key(parity_dir, tmp_path, mutate, needle):
    ckpt = copy_official(parity_dir, tmp_path)
    sd = torch.load(ckpt / "consolidated.pth", weights_only=True)
    mutate(sd)
    torch.save(sd, ckpt / "consolidated.pth")
    with pytest.raises(CheckpointError, match=needle):
        load_model(ckpt)


def test_truncated_checkpoint_fails_clearly(parity_dir, tmp_path):
    ckpt = copy_official(parity_dir, tmp_path)
    data = (ckpt / "consolidated.pth").read_bytes()
    (ckpt / "consolidated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_model(ckpt)


def test_pickled_code_is_never_executed(tmp_path, parity_dir):
    ckpt = copy_official(parity_dir, tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (marker.write_text, ("x",))

    torch.save({"embed.weight": Evil()}, ckpt / "consolidated.pth")
    with pytest.raises(CheckpointError):
        load_model(ckpt)
    assert not marker.exists()


def test_missing_pieces(tmp_path, parity_dir):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    ckpt = copy_official(parity_dir, tmp_path)
    (ckpt / "consolidated.pth").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(ckpt)


def test_bad_config_in_checkpoint_names_the_field(tmp_path, parity_dir):
    ckpt = copy_official(parity_dir, tmp_path)
    raw = json.loads((ckpt / "config.json").read_text())
    raw["model"]["norm_num_groups"] = 7
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="norm_num_groups"):
        load_model(ckpt)


def test_shards_with_a_gap_are_rejected(tmp_path, parity_dir):
    ckpt = copy_official(parity_dir, tmp_path)
    sd = torch.load(ckpt / "consolidated.pth", weights_only=True)
    (ckpt / "consolidated.pth").unlink()
    shards = split_into_shards(sd, 2)
    torch.save(shards[0], ckpt / "consolidated.00.pth")
    torch.save(shards[1], ckpt / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match="not numbered"):
        load_model(ckpt)
