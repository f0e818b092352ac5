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


# --- the engine configuration: one declaration for keywords, env vars, flags and docs -------------


def test_engine_options_come_from_the_environment(monkeypatch):
    from megalodon_infer.config import EngineConfig

    monkeypatch.setenv("MEGALODON_KERNELS", "reference")
    monkeypatch.setenv("MEGALODON_CUDA_GRAPHS", "false")
    monkeypatch.setenv("MEGALODON_MAX_NUM_SEQS", "3")
    config = EngineConfig(max_num_seqs=5)
    assert config.kernels == "reference" and config.cuda_graphs is False
    assert config.max_num_seqs == 5  # an explicit keyword wins over the environment
    with pytest.raises(ValueError, match="kernels"):
        EngineConfig(kernels="fastest")


def test_every_engine_option_is_a_server_setting_with_the_same_default():
    from megalodon_infer.config import EngineConfig
    from server.settings import ServerSettings

    for name, field in EngineConfig.model_fields.items():
        server_field = ServerSettings.model_fields[name]
        assert server_field.default == field.default and server_field.description == field.description, name
    settings = ServerSettings(kernels="reference", cuda_graphs=False, torch_threads=2, max_model_len=99)
    assert settings.engine_config() == EngineConfig(kernels="reference", cuda_graphs=False, torch_threads=2,
                                                    max_model_len=99)


def test_serve_help_lists_every_engine_option_without_importing_torch():
    import subprocess
    import sys

    from megalodon_infer.config import EngineConfig

    code = ("import sys\nfrom server.cli import build_parser\nprint(build_parser().format_help())\n"
            "assert 'torch' not in sys.modules, 'megalodon-serve --help imported torch'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())
    for name in EngineConfig.model_fields:
        assert "--" + name.replace("_", "-") in help_text and "MEGALODON_" + name.upper() in help_text
    assert "--no-cuda-graphs" in help_text


def test_docs_flag_table_is_generated_from_the_settings():
    from pathlib import Path

    from tools.flag_table import replace_in

    doc = Path(__file__).resolve().parents[1] / "docs" / "serving.md"
    text = doc.read_text()
    assert replace_in(text) == text, "docs/serving.md is stale: run `python -m tools.flag_table --write`"
