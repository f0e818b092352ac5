"""The model runner: decode through the chosen ops == the reference forward, and no host sync on the fused path."""

from __future__ import annotations

import pytest
import torch

from megalodon_infer import ModelConfig
from megalodon_infer.model.init import random_model
from megalodon_infer.worker.model_runner import ModelRunner
from tests.kernels.conftest import NO_CUDA

CFG = ModelConfig(num_layers=2, model_dim=64, z_dim=32, value_dim=64, num_heads=2, ffn_hidden_dim=96, cema_ndim=8,
                  norm_num_groups=4, vocab_size=97, chunk_size=16)
SLOTS = [3, 0, 5]
PROMPT_LENGTHS = [5, 16, 23]
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def prefill(runner: ModelRunner, slot: int, prompt: list[int]) -> torch.Tensor:
    """The prompt in segments that end at chunk boundaries, as the scheduler cuts them; last logits."""
    for start in range(0, len(prompt), CFG.chunk_size):
        logits = runner.prefill(slot, prompt[start:start + CFG.chunk_size], all_logits=False)
    return logits


@pytest.mark.parametrize("kernels", ["auto", "reference"])
def test_runner_decode_equals_the_reference_forward(device, kernels):
    model = random_model(CFG, seed=7, device=device)
    runner = ModelRunner(model, model.allocate_state(6), kernels=kernels)
    assert runner.decode_backend == ("fused" if kernels == "auto" else "reference")
    reference = model.allocate_state(6)
    slot_ids = torch.tensor(SLOTS, device=device)
    last = []
    for slot, prompt in zip(SLOTS, prompts(), strict=True):
        last.append(prefill(runner, slot, prompt)[-1])
        model(torch.tensor([prompt]), reference, slot_ids=torch.tensor([slot]))
    tokens = torch.stack(last).argmax(-1).tolist()
    for _ in range(CFG.chunk_size + 3):
        got = runner.decode(SLOTS, tokens)
        expected = model(torch.tensor(tokens)[:, None], reference, slot_ids=slot_ids)[0][:, 0]
        assert got.device == model.device and got.shape == (len(SLOTS), CFG.vocab_size)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        tokens = expected.argmax(-1).tolist()
    assert runner.state.position[SLOTS].tolist() == reference.position[SLOTS].tolist()


def test_fused_decode_reads_nothing_back_from_tensors(cpu_extension, monkeypatch):
    """No .item()/.tolist()/bool()/int()/float()/index on any tensor during a fused eager decode step."""
    model = random_model(CFG, seed=8)
    runner = ModelRunner(model, model.allocate_state(6), kernels="fused")
    for slot, prompt in zip(SLOTS, prompts(), strict=True):
        prefill(runner, slot, prompt)

    def refuse(self, *args, **kwargs):
        raise AssertionError("a decode step read a tensor value on the host")

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, refuse)
    logits = runner.decode(SLOTS, [1, 2, 3])
    monkeypatch.undo()
    assert logits.shape == (len(SLOTS), CFG.vocab_size)
    assert runner.state.position[SLOTS].tolist() == [n + 1 for n in PROMPT_LENGTHS]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_fused_cuda_decode_never_synchronizes():
    model = random_model(CFG, seed=8, device="cuda")
    runner = ModelRunner(model, model.allocate_state(6), kernels="fused")
    for slot, prompt in zip(SLOTS, prompts(), strict=True):
        prefill(runner, slot, prompt)
    runner.decode(SLOTS, [1, 2, 3])  # warm-up: lazy allocations happen outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            logits = runner.decode(SLOTS, [4, 5, 6])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logits.shape == (len(SLOTS), CFG.vocab_size)
