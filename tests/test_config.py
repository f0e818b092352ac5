from __future__ import annotations

import json

import pytest

from megalodon_infer import ConfigError, ModelConfig


def test_official_config_json_reads_the_model_section(parity_dir):
    cfg = ModelConfig.from_json_file(parity_dir / "config.json")
    assert (cfg.num_layers, cfg.model_dim, cfg.chunk_size, cfg.vocab_size) == (2, 64, 16, 256)
    assert cfg.effective_rope_base == 10000.0 and cfg.effective_output_size == 256


def test_defaults_are_the_official_modelconf():
    cfg = ModelConfig(vocab_size=32000)
    assert (cfg.num_layers, cfg.model_dim, cfg.z_dim, cfg.value_dim, cfg.num_heads) == (8, 1024, 256, 2048, 1)
    assert (cfg.ffn_hidden_dim, cfg.cema_ndim, cfg.chunk_size, cfg.norm_num_groups) == (2048, 16, 2048, 32)
    assert cfg.norm_eps == 1e-5 and cfg.norm_affine and not cfg.swiglu


@pytest.mark.parametrize("fields,needle", [
    (dict(z_dim=100, num_heads=3), "z_dim"),
    (dict(value_dim=100, num_heads=3, z_dim=96), "value_dim"),
    (dict(norm_num_groups=7), "norm_num_groups"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(efficient_attn="flash"), "efficient_attn"),
    (dict(bogus_field=1), "bogus_field"),
    (dict(num_layers="many"), "num_layers"),
])
def test_bad_configs_name_the_field(fields, needle):
    base = dict(vocab_size=100)
    base.update(fields)
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_dict(base)


def test_trainer_only_fields_are_accepted(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model": {"vocab_size": 10, "custom_bwd": True, "loss_parallel": False}}))
    assert ModelConfig.from_json_file(path).vocab_size == 10
