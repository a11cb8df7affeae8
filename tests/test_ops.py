"""The compiled-CPU decode ops (leanformers.models.ops) against torch's own linear and SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from leanformers.models.ops import MAX_ROWS, decode_attention, gemv, rowwise
from leanformers.quantize import Int8Linear


def test_rowwise_only_inside_a_compiled_graph():
    x = torch.randn(1, 1, 8)
    assert not rowwise(x)  # eager: keep F.linear
    seen = []

    @torch.compile(fullgraph=True, backend="eager")
    def probe(x, y):
        seen.append((rowwise(x), rowwise(y)))
        return x + 1

    probe(torch.randn(1, 6, 8), torch.randn(3, 3, 8))
    assert seen == [(True, False)]  # up to MAX_ROWS rows: gemv; nine rows: the matmul kernels
    assert MAX_ROWS == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_gemv_matches_linear(dtype):
    torch.manual_seed(0)
    w, b = torch.randn(48, 64, dtype=dtype), torch.randn(48, dtype=dtype)
    x = torch.randn(1, 1, 64, dtype=dtype)
    got = torch.compile(gemv, fullgraph=True)(x, w, b)
    ref = F.linear(x.float(), w.float(), b.float())
    assert got.dtype == dtype and got.shape == (1, 1, 48)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), ref, atol=tol * ref.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_gemv_rows_equal_single_rows(dtype):
    # several rows (a verification forward) give bit-identical results to one row at a time (decode steps)
    torch.manual_seed(0)
    w, b = torch.randn(96, 80, dtype=dtype), torch.randn(96, dtype=dtype)
    x = torch.randn(1, 5, 80, dtype=dtype)
    f = torch.compile(gemv, fullgraph=True, dynamic=False)
    many = f(x, w, b)
    one = torch.cat([f(x[:, i:i + 1], w, b) for i in range(5)], dim=1)
    assert many.shape == (1, 5, 96) and torch.equal(many, one)
    ref = F.linear(x.float(), w.float(), b.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(many.float(), ref, atol=tol * ref.abs().max().item(), rtol=tol)


def test_compiled_int8_linear_matches_its_dequantized_weight():
    torch.manual_seed(0)
    lin = Int8Linear.from_float(torch.randn(40, 64), torch.randn(40), dtype=torch.float32)
    x = torch.randn(1, 1, 64)
    got = torch.compile(lin, fullgraph=True)(x)
    ref = F.linear(x, lin.dequantize_weight(), lin.bias)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_attention_matches_sdpa(dtype):
    torch.manual_seed(0)
    B, H, Hkv, S, D = 2, 6, 2, 11, 16
    q = torch.randn(B, H, 1, D, dtype=dtype)
    k, v = torch.randn(B, Hkv, S, D, dtype=dtype), torch.randn(B, Hkv, S, D, dtype=dtype)
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[0, ..., :4] = False  # left padding of row 0
    mask[1, ..., 7:] = False  # slots not written yet
    got = torch.compile(decode_attention, fullgraph=True)(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), ref, atol=tol, rtol=tol)
    wrong = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    assert (got.float() - wrong).abs().max() > 10 * tol  # the mask matters in this test


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_attention_of_several_queries_is_causal_and_per_query(dtype):
    # a verification forward: T new queries at the end of the window, each sees the keys up to itself
    torch.manual_seed(1)
    torch.compiler.reset()
    H, Hkv, S, T, D = 6, 2, 13, 4, 16
    q = torch.randn(1, H, T, D, dtype=dtype)
    k, v = torch.randn(1, Hkv, S, D, dtype=dtype), torch.randn(1, Hkv, S, D, dtype=dtype)
    slots = torch.arange(S - T, S)
    mask = (torch.arange(S) <= slots[:, None])[None, None]  # (1, 1, T, S)
    f = torch.compile(decode_attention, fullgraph=True, dynamic=False)
    got = f(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), ref, atol=tol, rtol=tol)
    for i in range(T):  # query i alone, over its own prefix (what a one-token decode step computes)
        n = S - T + i + 1
        torch.compiler.reset()  # a fresh graph per shape (Dynamo's recompile limit is per function)
        alone = torch.compile(decode_attention, fullgraph=True, dynamic=False)(
            q[:, :, i:i + 1], k[:, :, :n], v[:, :, :n], torch.ones(1, 1, 1, n, dtype=torch.bool))
        torch.testing.assert_close(got[:, :, i:i + 1].float(), alone.float(), atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------ training memory
def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while `fn()` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("offset", [0.0, 1.0])  # Llama's weight, Gemma's 1 + weight
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_training_path_equals_eager_and_keeps_only_its_input(offset, dtype):
    from leanformers.models.ops import RMSNorm, _rms_norm

    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-6, offset)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 96).to(dtype).requires_grad_(True)
    g = torch.randn(3, 5, 96).to(dtype)
    y = norm(x)
    ref = _rms_norm(x, norm.weight, 1e-6, offset)  # the eager ops, through autograd
    assert torch.equal(y, ref)
    got = torch.autograd.grad(y, (x, norm.weight), g.to(y.dtype))
    want = torch.autograd.grad(ref, (x, norm.weight), g.to(ref.dtype))
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bfloat16: the eager ops round between steps
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        assert (a.float() - b.float()).abs().max() <= tol * b.float().abs().max()
    # the training path keeps x (and the weight); the eager ops also keep x / rms(x), as large as x
    lean = _saved_bytes(lambda: norm(x))
    eager = _saved_bytes(lambda: _rms_norm(x, norm.weight, 1e-6, offset))
    assert lean <= x.numel() * x.element_size() + norm.weight.numel() * 4 < eager


def test_silu_mul_training_path_is_the_eager_ops_bit_for_bit_and_keeps_less():
    from leanformers.models.ops import silu_mul

    torch.manual_seed(0)
    gate, up = (torch.randn(4, 7, 128, requires_grad=True) for _ in range(2))
    g = torch.randn(4, 7, 128)
    y, ref = silu_mul(gate, up), F.silu(gate) * up
    assert torch.equal(y, ref)
    for a, b in zip(torch.autograd.grad(y, (gate, up), g), torch.autograd.grad(ref, (gate, up), g)):
        assert torch.equal(a, b)
    lean, eager = _saved_bytes(lambda: silu_mul(gate, up)), _saved_bytes(lambda: F.silu(gate) * up)
    assert lean == 2 * gate.numel() * 4 and eager == 3 * gate.numel() * 4
    with torch.no_grad():  # inference: the plain ops, nothing kept
        assert torch.equal(silu_mul(gate, up), ref)
