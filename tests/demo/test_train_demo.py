"""The demo training script: data-parallel workers train the same model as one process, and pilot
overrides of the recipe are typed like the recipe's fields."""

from __future__ import annotations

import dataclasses

import pytest
import safetensors.torch
import torch
import torch.multiprocessing as mp

from scripts.train_demo import (
    Recipe,
    TrainingData,
    build_model,
    first_unread_window,
    free_port,
    parse_override,
    train_worker,
)
from tools.demo_scoring import demo_model_dir

TINY = Recipe(init_from_rev=None, num_layers=1, model_dim=32, z_dim=16, value_dim=64,
              ffn_hidden_dim=64, cema_ndim=2, chunk_size=8, norm_num_groups=4, seq_len=32, batch_size=4,
              steps=3, warmup_steps=1, lr=1e-2)


def tiny_data() -> TrainingData:
    tokenizer_model = (demo_model_dir() / "tokenizer.model").read_bytes()
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(3, TINY.vocab_size, (24, TINY.seq_len + 1), generator=g)
    val_windows = torch.randint(3, TINY.vocab_size, (4, TINY.seq_len + 1), generator=g)
    return TrainingData(windows, 2, val_windows, tokenizer_model, eos_id=2, base_state=None,
                        record={"recipe": "tiny"})


@pytest.mark.slow
def test_two_data_parallel_workers_train_the_same_weights_as_one_process(tmp_path):
    data = tiny_data()
    train_worker(0, 1, 0, data, TINY, tmp_path / "one", False, TINY.steps)
    mp.spawn(train_worker, args=(2, free_port(), data, TINY, tmp_path / "two", False, TINY.steps), nprocs=2)

    one = safetensors.torch.load_file(tmp_path / "one" / "model.safetensors")
    two = safetensors.torch.load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5)  # moves are ~2e-2
    # Training moved the weights, so equal weights are not two untouched initialisations.
    initial = build_model(TINY, None).state_dict()
    assert (one["embed.weight"] - initial["embed.weight"]).abs().max() > 1e-3


def test_recipe_overrides_are_typed_like_the_fields():
    assert parse_override("lr=3e-4") == ("lr", 3e-4)
    assert parse_override("steps=80") == ("steps", 80)
    assert parse_override("init_from_rev=None") == ("init_from_rev", None)
    assert parse_override("init_from_rev=abc1234") == ("init_from_rev", "abc1234")
    assert parse_override("betas=0.9,0.99") == ("betas", (0.9, 0.99))
    with pytest.raises(SystemExit, match="no field 'learning_rate'"):
        parse_override("learning_rate=1e-3")


def test_a_continuation_starts_past_the_windows_its_base_read():
    recipe = Recipe()
    base = {"recipe": {"seed": recipe.seed, "seq_len": recipe.seq_len, "train_text_bytes": recipe.train_text_bytes,
                       "batch_size": 4},
            "num_train_tokens": 1000, "steps_done": 1200}
    assert first_unread_window(base, recipe, 1000, 30_000) == 4800  # v3's record: no first_window, started at 0
    assert first_unread_window({**base, "first_window": 4800, "steps_done": 2000}, recipe, 1000, 30_000) == 12_800
    assert first_unread_window(base, recipe, 999, 30_000) == 0  # other text: another window order
    assert first_unread_window(base, dataclasses.replace(recipe, seed=7), 1000, 30_000) == 0
    assert first_unread_window(base, recipe, 1000, 4802) == 0  # the base read (nearly) a whole epoch
    assert first_unread_window(None, recipe, 1000, 30_000) == 0
