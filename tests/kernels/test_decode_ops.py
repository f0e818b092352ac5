"""Fused decode ops == their torch reference twins, on random inputs addressed by random slot subsets."""

from __future__ import annotations

import pytest
import torch

from megalodon_infer.kernels import decode
from megalodon_infer.model.cema import CEMA
from megalodon_infer.model.norms import TimestepNorm

BF16_ULP = 2.0**-7  # relative spacing of bfloat16 values


def random_norm_and_cema(D: int, G: int, N: int, dtype: torch.dtype, device: str, g: torch.Generator,
                         prior_count: int) -> tuple[decode.TsnWeights, decode.CemaWeights]:
    norm, cema = TimestepNorm(D, G), CEMA(D, N)
    with torch.no_grad():
        for p in (*norm.parameters(), *cema.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
        norm.prior_count.fill_(prior_count)
    norm, cema = norm.to(device=device, dtype=dtype), cema.to(device=device, dtype=dtype)
    return decode.TsnWeights.from_module(norm, torch.float32), decode.CemaWeights.from_module(cema, torch.float32)


def tsn_case(device: str, dtype: torch.dtype, seed: int, prior_count: int = 0):
    """A pool of S slots, B rows on a random slot subset; one fresh slot, one at count 1, others deep."""
    S, B, D, G, N = 9, 5, 48, 4, 6
    g = torch.Generator().manual_seed(seed)
    tsn, cema = random_norm_and_cema(D, G, N, dtype, device, g, prior_count)
    slot_ids = torch.randperm(S, generator=g)[:B]
    position = torch.randint(2, 5000, (S,), generator=g)
    position[slot_ids[0]], position[slot_ids[1]] = 0, 1
    state = dict(
        mean=torch.randn(S, G, generator=g) * 2,
        var=torch.rand(S, G, generator=g) * 3 + 0.05,
        cema_h=torch.complex(torch.randn(S, D, N, generator=g), torch.randn(S, D, N, generator=g)),
    )
    x = (torch.randn(B, D, generator=g) * 3 + 1).to(dtype)
    state = {k: v.to(device) for k, v in state.items()}
    return x.to(device), slot_ids.to(device), position.to(device), state, tsn, cema


def assert_activation_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.dtype == torch.bfloat16:
        # Both sides round the same fp32 math to bf16 (round-to-nearest-even); an fp32 difference in
        # the last bits may still cross a rounding boundary, so allow one ulp but demand that almost
        # every element is bit-identical.
        torch.testing.assert_close(actual.float(), expected.float(), rtol=BF16_ULP, atol=1e-3)
        assert (actual == expected).float().mean() >= 0.95
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("seed,prior_count", [(0, 0), (1, 0), (2, 3)])
def test_tsn_cema_step_matches_reference(device, dtype, seed, prior_count):
    x, slot_ids, position, state, tsn, cema = tsn_case(device, dtype, seed, prior_count)
    ref_state = {k: v.clone() for k, v in state.items()}
    before = {k: v.clone() for k, v in state.items()}
    x_hat, y = decode.tsn_cema_decode_step(x, slot_ids, position, state["mean"], state["var"], state["cema_h"],
                                           tsn, cema)
    x_hat_ref, y_ref = decode.tsn_cema_decode_step_ref(x, slot_ids, position, ref_state["mean"], ref_state["var"],
                                                       ref_state["cema_h"], tsn, cema)
    assert_activation_close(x_hat, x_hat_ref)
    assert_activation_close(y, y_ref)
    state_tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=4 * BF16_ULP, atol=1e-2)
    torch.testing.assert_close(state["mean"], ref_state["mean"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state["var"], ref_state["var"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state["cema_h"], ref_state["cema_h"], **state_tol)
    untouched = torch.ones(position.shape[0], dtype=torch.bool, device=device)
    untouched[slot_ids] = False
    for name, tensor in state.items():
        assert torch.equal(tensor[untouched], before[name][untouched]), f"{name}: a slot outside slot_ids changed"
        assert not torch.equal(tensor[slot_ids], before[name][slot_ids]), f"{name}: the addressed slots did not change"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_final_norm_step_matches_reference(device, dtype):
    x, slot_ids, position, state, tsn, _ = tsn_case(device, dtype, seed=5)
    ref_mean, ref_var = state["mean"].clone(), state["var"].clone()
    y = decode.final_norm_step(x, slot_ids, position, state["mean"], state["var"], tsn)
    y_ref = decode.final_norm_step_ref(x, slot_ids, position, ref_mean, ref_var, tsn)
    assert_activation_close(y, y_ref)
    torch.testing.assert_close((state["mean"], state["var"]), (ref_mean, ref_var), rtol=1e-5, atol=1e-6)


def attention_case(device: str, kv_dtype: torch.dtype, dv: int, fills: torch.Tensor, g: torch.Generator):
    """Random pools (garbage past every fill), B rows on random slots with the given fills, in varied chunks."""
    S, C, H, dz = 7, 16, 2, 8
    B = fills.shape[0]
    slot_ids = torch.randperm(S, generator=g)[:B]
    position = torch.randint(0, 4 * C, (S,), generator=g)
    position[slot_ids] = torch.randint(0, 4, (B,), generator=g) * C + fills
    keys = torch.randn(S, C, H, dz, generator=g).to(kv_dtype)
    values = torch.randn(S, C, H, dv, generator=g).to(kv_dtype)
    q = torch.randn(B, H, dz, generator=g) * 2
    k_new = torch.randn(B, H, dz, generator=g).to(kv_dtype)
    v_new = torch.randn(B, H, dv, generator=g).to(kv_dtype)
    return [t.to(device) for t in (q, k_new, v_new, keys, values, slot_ids, position)]


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16], ids=["kv-f32", "kv-bf16"])
@pytest.mark.parametrize("dv", [24, 20], ids=["dv24", "dv20"])  # CUDA: 16-byte vector path, scalar path
def test_attention_decode_matches_reference_for_every_fill(device, kv_dtype, dv):
    g = torch.Generator().manual_seed(dv)
    C, B = 16, 4
    every_fill = torch.randperm(C, generator=g)
    # CUDA key splits: planned, one, three (uneven), sixteen (one key each); the CPU kernel plans its own.
    split_options = [0, 1, 3, 16] if device == "cuda" else [0]
    for call in range(C // B):  # together the calls cover every fill 0 .. C-1
        q, k_new, v_new, keys, values, slot_ids, position = attention_case(
            device, kv_dtype, dv, every_fill[call * B:(call + 1) * B], g)
        ref_keys, ref_values = keys.clone(), values.clone()
        expected = decode.attention_decode_ref(q, k_new, v_new, ref_keys, ref_values, slot_ids, position)
        for splits in split_options:
            got_keys, got_values = keys.clone(), values.clone()
            out = decode.attention_decode(q, k_new, v_new, got_keys, got_values, slot_ids, position, splits)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            assert torch.equal(got_keys, ref_keys) and torch.equal(got_values, ref_values)


def test_attention_decode_fresh_chunk_returns_the_new_value(device):
    """Fill 0 (position a multiple of C): the new key is the only key, so the output is v_new exactly."""
    g = torch.Generator().manual_seed(3)
    fills = torch.zeros(3, dtype=torch.long)
    q, k_new, v_new, keys, values, slot_ids, position = attention_case(device, torch.float32, 24, fills, g)
    out = decode.attention_decode(q, k_new, v_new, keys, values, slot_ids, position)
    torch.testing.assert_close(out, v_new.reshape(3, -1), rtol=0, atol=1e-6)


def test_cpu_kernels_reject_bad_slot_ids(cpu_extension):
    g = torch.Generator().manual_seed(4)
    q, k_new, v_new, keys, values, slot_ids, position = attention_case("cpu", torch.float32, 24,
                                                                       torch.tensor([1, 2]), g)
    with pytest.raises(RuntimeError, match="appears twice"):
        decode.attention_decode(q, k_new, v_new, keys, values, slot_ids[[0, 0]], position)
    with pytest.raises(RuntimeError, match="out of range"):
        decode.attention_decode(q, k_new, v_new, keys, values, torch.tensor([0, 7]), position)


@pytest.mark.parametrize("threads", [3, 5])
def test_cpu_attention_splits_keys_when_rows_are_few(cpu_extension, threads):
    """Fewer (row, head) pairs than threads: keys split across tasks and merged by log-sum-exp."""
    g = torch.Generator().manual_seed(threads)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for fill in range(16):  # one row, two heads: rows < threads, every fill including 0 and C-1
            q, k_new, v_new, keys, values, slot_ids, position = attention_case(
                "cpu", torch.bfloat16, 24, torch.tensor([fill]), g)
            ref_keys, ref_values = keys.clone(), values.clone()
            expected = decode.attention_decode_ref(q, k_new, v_new, ref_keys, ref_values, slot_ids, position)
            out = decode.attention_decode(q, k_new, v_new, keys, values, slot_ids, position)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            assert torch.equal(keys, ref_keys) and torch.equal(values, ref_values)
    finally:
        torch.set_num_threads(saved)
