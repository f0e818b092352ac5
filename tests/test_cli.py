"""`megalodon-infer convert` and `info`: exact conversion, shards, clear failures, the reported numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import copy_official, logits_of, write_shards

from megalodon_infer import load_model, request_state_bytes, slot_bytes
from megalodon_infer.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_convert_gives_identical_logits(parity_dir, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "convert", parity_dir, tmp_path / "ours")
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["config.json", "model.safetensors"]
    assert "no tokenizer found" in out
    assert torch.equal(logits_of(load_model(tmp_path / "ours")), logits_of(load_model(parity_dir)))


def test_convert_merges_model_parallel_shards_with_progress(parity_dir, tmp_path, capsys):
    ckpt = copy_official(parity_dir, tmp_path)
    write_shards(ckpt, 2)
    code, _, err = run_cli(capsys, "convert", ckpt, tmp_path / "ours")
    assert code == 0
    assert "reading checkpoint" in err and "2/2" in err  # the tqdm bar over shard files
    assert torch.equal(logits_of(load_model(tmp_path / "ours")), logits_of(load_model(parity_dir)))


def test_convert_to_bfloat16_and_tokenizer_copy(parity_dir, tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.model").write_bytes(b"sentencepiece model bytes")
    (tok_dir / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    code, _, _ = run_cli(capsys, "convert", parity_dir, tmp_path / "ours", "--dtype", "bfloat16",
                         "--tokenizer", tok_dir / "tokenizer.model")
    assert code == 0
    assert (tmp_path / "ours" / "tokenizer.model").read_bytes() == b"sentencepiece model bytes"
    assert (tmp_path / "ours" / "tokenizer_config.json").exists()
    converted = load_model(tmp_path / "ours", dtype="bfloat16")
    reference = load_model(parity_dir, dtype="bfloat16")
    assert converted.embed.weight.dtype == torch.bfloat16
    assert torch.equal(logits_of(converted), logits_of(reference))


def test_tokenizer_beside_the_checkpoint_directory_is_copied(parity_dir, tmp_path, capsys):
    ckpt = copy_official(parity_dir, tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"from the release root")
    code, out, _ = run_cli(capsys, "convert", ckpt, tmp_path / "ours")
    assert code == 0 and f"tokenizer from {tmp_path}" in out
    assert (tmp_path / "ours" / "tokenizer.model").read_bytes() == b"from the release root"


def truncate(ckpt: Path) -> None:
    data = (ckpt / "consolidated.pth").read_bytes()
    (ckpt / "consolidated.pth").write_bytes(data[: len(data) // 2])


def wrong_shape(ckpt: Path) -> None:
    sd = torch.load(ckpt / "consolidated.pth", weights_only=True)
    sd["layers.0.mega.cema.alpha"] = torch.zeros(64, 5, 1)
    torch.save(sd, ckpt / "consolidated.pth")


def missing_key(ckpt: Path) -> None:
    sd = torch.load(ckpt / "consolidated.pth", weights_only=True)
    del sd["layers.1.nffn.fc1.weight"]
    torch.save(sd, ckpt / "consolidated.pth")


def bad_config(ckpt: Path) -> None:
    raw = json.loads((ckpt / "config.json").read_text())
    raw["model"]["norm_num_groups"] = 7
    (ckpt / "config.json").write_text(json.dumps(raw))


def no_weights(ckpt: Path) -> None:
    (ckpt / "consolidated.pth").unlink()


@pytest.mark.parametrize("damage,needle", [
    (truncate, "cannot read checkpoint"),
    (wrong_shape, "key 'layers.0.mega.cema.alpha' has shape (64, 5, 1), expected (64, 4, 1)"),
    (missing_key, "missing key 'layers.1.nffn.fc1.weight'"),
    (bad_config, "norm_num_groups"),
    (no_weights, "no weights in"),
])
def test_bad_checkpoint_fails_clearly_and_writes_nothing(parity_dir, tmp_path, capsys, damage, needle):
    ckpt = copy_official(parity_dir, tmp_path)
    damage(ckpt)
    code, _, err = run_cli(capsys, "convert", ckpt, tmp_path / "ours")
    assert code == 1
    assert err.startswith("megalodon-infer convert: error: ") and needle in err
    assert "Traceback" not in err
    assert not (tmp_path / "ours").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["official"]  # no staging directory left behind


def test_convert_refuses_to_overwrite_unless_asked(parity_dir, tmp_path, capsys):
    dst = tmp_path / "ours"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    code, _, err = run_cli(capsys, "convert", parity_dir, dst)
    assert code == 1 and "--overwrite" in err and (dst / "keep.txt").exists()
    code, _, _ = run_cli(capsys, "convert", parity_dir, dst, "--overwrite")
    assert code == 0 and not (dst / "keep.txt").exists() and (dst / "model.safetensors").exists()


def test_info_reports_parameters_and_state_bytes(parity_dir, capsys):
    code, out, _ = run_cli(capsys, "info", parity_dir, "--json")
    assert code == 0
    info = json.loads(out)
    model = load_model(parity_dir)
    cfg = model.config
    assert info["config"] == cfg.to_json_dict()
    assert info["num_parameters"] == model.num_parameters()
    assert info["weight_files"] == ["consolidated.pth"]
    assert info["state_bytes"] == {
        "chunk_boundary_fp32_kv": request_state_bytes(cfg, torch.float32, num_kv=0),
        "worst_case_fp32_kv": request_state_bytes(cfg, torch.float32),
        "slot_fp32_kv": slot_bytes(cfg, torch.float32),
        "chunk_boundary_bf16_kv": request_state_bytes(cfg, torch.bfloat16, num_kv=0),
        "worst_case_bf16_kv": request_state_bytes(cfg, torch.bfloat16),
        "slot_bf16_kv": slot_bytes(cfg, torch.bfloat16),
    }
    code, text, _ = run_cli(capsys, "info", parity_dir)
    assert code == 0
    assert f"parameters: {model.num_parameters():,}" in text
    assert f"{request_state_bytes(cfg, torch.bfloat16):,} bytes worst case" in text
    assert "chunk_size: 16" in text


def test_info_of_a_missing_directory_fails_clearly(tmp_path, capsys):
    code, _, err = run_cli(capsys, "info", tmp_path / "nope")
    assert code == 1 and "does not exist" in err


@pytest.mark.slow
def test_console_entry_point_runs_as_a_process(parity_dir):
    """The installed command is `megalodon_infer.cli:main`; run it as a separate process."""
    ok = subprocess.run([sys.executable, "-m", "megalodon_infer.cli", "info", str(parity_dir)],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "parameters:" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "megalodon_infer.cli", "convert", str(parity_dir / "nope"), "x"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_generate_streams_the_engines_text(capsys):
    from megalodon_infer import SamplingParams
    from megalodon_infer.config import DEMO_MODEL_DIR
    from megalodon_infer.engine.llm import LLM

    prompt = "import os\n\ndef read_config(path):\n"
    assert main(["generate", prompt, "--max-tokens", "24", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    expected = LLM(DEMO_MODEL_DIR).generate([prompt], SamplingParams(temperature=0, max_tokens=24))[0]
    assert captured.out == expected.outputs[0].text
    assert f"[{len(expected.outputs[0].token_ids)} tokens, finish reason: " in captured.err


def test_generate_needs_a_tokenizer(parity_dir, capsys):
    assert main(["generate", "hello", "--model", str(parity_dir)]) == 1
    assert "has no tokenizer.model" in capsys.readouterr().err
