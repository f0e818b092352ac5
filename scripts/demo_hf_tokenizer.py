"""Write `tokenizer.json` beside a model directory's `tokenizer.model`, so that
`transformers.AutoTokenizer.from_pretrained(<dir>)` loads the same tokenizer without sentencepiece
(guidellm, lm-eval and other clients that only take `--tokenizer <dir>`).

    python scripts/demo_hf_tokenizer.py megalodon_infer/demo_model

Needs `transformers` and `sentencepiece` (and protobuf) to convert; loading needs neither
sentencepiece nor protobuf. The conversion is transformers' own LLaMA one, with one fix: its
Metaspace pre-tokenizer adds the dummy-prefix space only when the text does not already start with
a space, while sentencepiece always adds it. For code, text that starts with indentation is common,
so the dummy prefix is made a normalizer step (Prepend, then Replace spaces), as sentencepiece does
it, and the ids agree on every text (checked on the evaluation set by `tests/demo`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

SPACE = "\u2581"  # sentencepiece's visible space


def write_hf_tokenizer(model_dir: Path) -> Path:
    """Convert `model_dir/tokenizer.model`; writes `model_dir/tokenizer.json`, returns its path.

    Also names the class in tokenizer_config.json ("PreTrainedTokenizerFast": load tokenizer.json
    as it is, in transformers 4 and 5 alike) and keeps the special tokens the server reads there.
    """
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        # BOS/EOS given here, not read from the directory: a fresh one has no tokenizer_config.json
        # yet, and the converted post-processor must add <s> as the server does.
        converted = LlamaTokenizer.from_pretrained(str(model_dir), legacy=False, add_bos_token=True,
                                                   add_eos_token=False)
        converted.save_pretrained(tmp)
        spec = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": SPACE},
        {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
    ]}
    spec["pre_tokenizer"] = None
    out = model_dir / "tokenizer.json"
    out.write_text(json.dumps(spec, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config.update({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False})
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    print(f"wrote {write_hf_tokenizer(parser.parse_args().model_dir)}")


if __name__ == "__main__":
    main()
