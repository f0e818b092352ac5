"""The bundled demo model: it loads, it is good on held-out files only when the decode path is right,
it uses context across chunk boundaries, token-by-token greedy decode matches the parallel forward,
and `transformers.AutoTokenizer` reads the same tokenizer without sentencepiece.

The held-out text (pip, setuptools and wheel: packages the model never trained on) is committed
under tests/data by scripts/train_demo.py, so nothing here reads the interpreter's own packages.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megalodon_infer import Megalodon, MegalodonState, load_model
from megalodon_infer.tokenization.tokenizer import Tokenizer
from scripts.demo_hf_tokenizer import write_hf_tokenizer
from tools.demo_scoring import context_nll, demo_model_dir, load_eval_texts, own_unigram_nll, sequence_nll

DATA = Path(__file__).resolve().parents[1] / "data"
NUM_DOCS = 16
TARGET_CHUNK = 8
# NOTE: thresholds for the committed model on the slice below (16 files x 576 targets of pip,
# setuptools and wheel). Perplexity measures 20.9 (the slice's own unigram: 283, ratio 0.074). A
# decode that loses state hurts most right after a chunk boundary, where attention has nothing yet
# to look at and the model leans on CEMA and the norm statistics, so the boundary threshold is on
# the first 8 tokens of every chunk after the first: 23.4 with the state carried; 44.6 (CEMA state
# lost), 50.4 (everything reset) and 230,272 (norm statistics reset) with it broken (see the
# broken decodes below).
PPL_THRESHOLD = 23.5
UNIGRAM_RATIO_THRESHOLD = 0.09
BOUNDARY_TOKENS = 8
BOUNDARY_PPL_THRESHOLD = 33.0


@pytest.fixture(scope="module")
def model() -> Megalodon:
    return load_model(demo_model_dir())


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer.from_dir(demo_model_dir())
    assert tok is not None
    return tok


@pytest.fixture(scope="module")
def carried_nll(model: Megalodon, heldout: torch.Tensor) -> torch.Tensor:
    return sequence_nll(model, heldout)


@pytest.fixture(scope="module")
def heldout(model: Megalodon, tokenizer: Tokenizer) -> torch.Tensor:
    """[NUM_DOCS, 9C + 1]: the first held-out files long enough, cut to 9 chunks of targets."""
    length = (TARGET_CHUNK + 1) * model.config.chunk_size + 1
    docs = []
    for text in load_eval_texts():
        ids = tokenizer.encode(text, add_bos=True, add_eos=True, parse_special_tokens=False)
        if len(ids) >= length:
            docs.append(ids[:length])
    assert len(docs) >= NUM_DOCS
    return torch.tensor(docs[:NUM_DOCS])


def perplexity(nll: torch.Tensor) -> float:
    return nll.double().mean().exp().item()


def boundary_perplexity(nll: torch.Tensor, chunk_size: int) -> float:
    """Perplexity of the first BOUNDARY_TOKENS predictions of every chunk after the first.

    nll: [B, T - 1], where column j is predicted from input token j (position j mod C in its chunk).
    """
    after_first = nll[:, chunk_size:]
    in_chunk = torch.arange(after_first.shape[1]) % chunk_size
    return perplexity(after_first[:, in_chunk < BOUNDARY_TOKENS])


def test_bundled_model_is_complete_and_small(model, tokenizer):
    directory = demo_model_dir()
    assert (directory / "model.safetensors").stat().st_size <= 60 * 2**20  # what a git clone tolerates
    assert tokenizer.vocab_size == model.config.vocab_size
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    assert 1_000_000 < model.num_parameters() < 30_000_000
    text = load_eval_texts()[0]
    assert tokenizer.decode(tokenizer.encode(text)) == text  # code round-trips exactly


def test_training_never_saw_the_evaluation_packages():
    """The recorded corpus: pip, setuptools and wheel are evaluation text only, and validation
    holds out whole packages."""
    record = json.loads((demo_model_dir() / "config.json").read_text())["training"]
    trained = {req.split("==")[0].lower() for req in record["packages"]}
    assert {"pip", "setuptools", "wheel"}.isdisjoint(trained)
    assert record["evaluation_packages"] == ["pip", "setuptools", "wheel"]
    assert record["validation_packages"]
    eval_packages = {json.loads(line)["package"] for line in (DATA / "demo_heldout.jsonl").read_text().splitlines()}
    assert eval_packages == {"pip", "setuptools", "wheel"}


# Run in a child interpreter where sentencepiece cannot be imported: what a client with only
# `transformers` installed (guidellm, lm-eval) gets from `--tokenizer <model dir>`.
_HF_ENCODE = """
import json, sys
sys.modules["sentencepiece"] = None
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
texts = json.load(sys.stdin)
ids = [tok(t)["input_ids"] for t in texts]
print(json.dumps({"ids": ids, "decoded": [tok.decode(i, skip_special_tokens=True) for i in ids],
                  "bos": tok.bos_token_id, "eos": tok.eos_token_id}))
"""


def test_fast_tokenizer_file_is_what_the_training_script_writes(tmp_path):
    """tokenizer.json is reproducible from tokenizer.model alone, as train_demo.py writes it into a
    fresh directory (it once lost the BOS post-processor when no tokenizer_config.json was there yet)."""
    (tmp_path / "tokenizer.model").write_bytes((demo_model_dir() / "tokenizer.model").read_bytes())
    written = json.loads(write_hf_tokenizer(tmp_path).read_text(encoding="utf-8"))
    assert written == json.loads((demo_model_dir() / "tokenizer.json").read_text(encoding="utf-8"))


def test_autotokenizer_without_sentencepiece_matches_the_server_tokenizer(tokenizer):
    texts = ["def f(x):\n    return x  # hi\n", "    indented first line\n\n\tand a tab", " x", "x", "",
             "héllo wörld ✓ 😀 \u00a0\n", *load_eval_texts()[:40]]
    run = subprocess.run([sys.executable, "-c", _HF_ENCODE, str(demo_model_dir())], input=json.dumps(texts),
                         capture_output=True, text=True, check=True)
    hf = json.loads(run.stdout)
    assert (hf["bos"], hf["eos"]) == (tokenizer.bos_id, tokenizer.eos_id)
    ours = [tokenizer.encode(t, add_bos=True, add_eos=False, parse_special_tokens=False) for t in texts]
    assert hf["ids"] == ours
    assert hf["decoded"] == texts


def test_heldout_perplexity_is_low_and_far_below_unigram(model, heldout, carried_nll):
    ppl = perplexity(carried_nll)
    unigram = perplexity(own_unigram_nll(heldout[:, 1:].flatten().tolist()))
    assert ppl < PPL_THRESHOLD
    assert ppl < UNIGRAM_RATIO_THRESHOLD * unigram
    assert boundary_perplexity(carried_nll, model.config.chunk_size) < BOUNDARY_PPL_THRESHOLD


def reset_everything(model: Megalodon, state: MegalodonState) -> None:
    model.reset_rows(state, torch.arange(state.batch_size))


def forget_cema(model: Megalodon, state: MegalodonState) -> None:
    state.cema_h.zero_()


def forget_norm_statistics(model: Megalodon, state: MegalodonState) -> None:
    norms = [layer.mega.timenorm for layer in model.layers] + [model.output.final_norm]
    for i, norm in enumerate(norms):
        state.norm_mean[i], state.norm_var[i] = norm.initial_stats(state.batch_size, state.norm_mean.dtype)


@pytest.mark.parametrize("break_state", [reset_everything, forget_cema, forget_norm_statistics])
def test_broken_decode_cannot_reach_the_threshold(model, heldout, break_state):
    """The thresholds above are ones that only a decode carrying the whole state can meet."""
    nll = sequence_nll(model, heldout, at_chunk_boundary=break_state)
    assert boundary_perplexity(nll, model.config.chunk_size) > BOUNDARY_PPL_THRESHOLD


def test_preceding_chunks_lower_perplexity(model, heldout, carried_nll):
    """Context from earlier chunks (reaching the target only through CEMA and the norm statistics
    beyond the previous chunk) lowers perplexity. On this text, one chunk of context gets all of
    the gain that eight get (20.7 with none, 18.2 with one, 18.1 with eight), so the test does not ask for more."""
    docs = heldout.tolist()
    none, one = (perplexity(context_nll(model, docs, TARGET_CHUNK, k)) for k in (0, 1))
    eight_nll = context_nll(model, docs, TARGET_CHUNK, 8)
    assert one < 0.95 * none
    assert perplexity(eight_nll) < 0.95 * none
    # Eight chunks of context reach back to the file's first token, so they must score the target
    # chunk exactly as the chunk-by-chunk pass over the whole file does.
    C = model.config.chunk_size
    assert torch.allclose(eight_nll, carried_nll[:, TARGET_CHUNK * C:], atol=1e-4)


def test_greedy_decode_equals_argmax_of_parallel_forward(model, tokenizer):
    prompt = tokenizer.encode("import os\nimport sys\n\n\ndef main(argv):\n    ")
    num_new = 150
    C = model.config.chunk_size
    assert len(prompt) + num_new > 2 * C  # decode crosses at least two chunk boundaries

    state = model.allocate_state(1)
    logits, state = model.forward(torch.tensor([prompt]), state, last_only=True)
    generated = []
    for _ in range(num_new):
        generated.append(int(logits[0, -1].argmax()))
        logits, state = model.forward(torch.tensor([[generated[-1]]]), state)

    sequence = torch.tensor([prompt + generated])
    start = len(prompt) - 1
    one_pass, _ = model.forward(sequence[:, :-1], model.allocate_state(1))
    assert one_pass[0, start:].argmax(-1).tolist() == generated
    padded_len = -(-sequence.shape[1] // C) * C  # forward_train wants whole chunks; padding is causal-safe
    padded = torch.nn.functional.pad(sequence, (0, padded_len - sequence.shape[1]), value=tokenizer.eos_id)
    with torch.no_grad():
        train_logits = model.forward_train(padded)
    assert train_logits[0, start:sequence.shape[1] - 1].argmax(-1).tolist() == generated
    assert "\n" in tokenizer.decode(generated)
