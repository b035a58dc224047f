import os
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

from dalle_core import cpu_fast, sampling
from dalle_core.transformer import DALLE, DALLEConfig


@pytest.fixture
def attend():
    k = cpu_fast.kernel()
    if k is None and shutil.which(os.environ.get("CC") or "cc") is None:
        pytest.skip("no C compiler on this machine: sampling uses PyTorch's attention")
    assert k is not None, "there is a C compiler, but the decode attention did not build or failed its self-check"
    return k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hs", [32, 64, 20])  # two of the specialised head sizes and the generic loop
def test_decode_step_writes_the_cache_and_matches_sdpa(attend, dtype, hs):
    g = torch.Generator().manual_seed(0)
    B, nh, L = 3, 4, 50
    k, v = (torch.randn(B, nh, L, hs, generator=g).to(dtype) for _ in range(2))
    for n in (1, 17, L):
        qkv = torch.randn(B, 1, 3 * nh * hs, generator=g).to(dtype)
        q, k_new, v_new = (t.view(B, 1, nh, hs).transpose(1, 2) for t in qkv.split(nh * hs, dim=2))
        before = k.clone()
        out = attend(qkv, k, v, n)
        assert torch.equal(k[:, :, n - 1:n], k_new) and torch.equal(v[:, :, n - 1:n], v_new)
        assert torch.equal(k[:, :, :n - 1], before[:, :, :n - 1]) and torch.equal(k[:, :, n:], before[:, :, n:])
        expect = F.scaled_dot_product_attention(q.float(), k[:, :, :n].float(), v[:, :, :n].float())
        expect = expect.transpose(1, 2).reshape(B, 1, nh * hs)
        assert out.dtype == dtype and out.shape == (B, 1, nh * hs)
        assert torch.allclose(out.float(), expect, atol=1e-5 if dtype == torch.float32 else 1e-2), n


def _model():
    torch.manual_seed(0)
    c = DALLEConfig(text_vocab=50, text_len=6, image_vocab=20, image_grid=3, dim=64, depth=2, heads=2)
    m = DALLE(c).eval()
    with torch.no_grad():
        m.image_head.weight.mul_(50)
    return m, torch.randint(1, c.text_vocab, (2, c.text_len))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sampling_with_and_without_the_kernel_sees_the_same_logits(attend, monkeypatch, precision):
    model, text = _model()
    runs = []
    for kernel in (attend, None):
        monkeypatch.setattr(cpu_fast, "kernel", lambda kernel=kernel: kernel)
        seen = {}
        codes = sampling.sample(model, text, sampling.SamplingSettings(cond_scale=3.0), precision=precision,
                                on_logits=lambda i, lg, seen=seen: seen.__setitem__(i, lg),
                                generator=torch.Generator().manual_seed(3))
        runs.append((codes, seen))
    (codes, with_kernel), (_, without) = runs
    tol = 1e-4 if precision == "fp32" else 0.05  # bf16: keys/values rounded to bf16 with the kernel only
    for i in range(codes.shape[1]):
        scale = without[i].abs().max()
        assert (with_kernel[i] - without[i]).abs().max() <= tol * scale, i


def test_no_compiler_falls_back_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("DALLE_KERNEL_DIR", str(tmp_path / "kernels"))
    cpu_fast.kernel.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cpu_fast.kernel() is None
        assert any("compiled decode attention is unavailable" in str(w.message) for w in caught)
        model, text = _model()
        # PyTorch's attention instead
        codes = sampling.sample(model, text, sampling.SamplingSettings(cond_scale=3.0), precision="bf16")
        assert codes.shape == (2, 9)
    finally:
        cpu_fast.kernel.cache_clear()


def test_a_broken_build_is_not_used(tmp_path, monkeypatch):
    """A compiler that succeeds but builds a wrong kernel is caught by the self-check."""
    wrong = tmp_path / "wrong.c"
    wrong.write_text(cpu_fast.SOURCE.read_text().replace("STORE(o[d] / sum)", "STORE(o[d])"))
    monkeypatch.setattr(cpu_fast, "SOURCE", wrong)
    monkeypatch.setenv("DALLE_KERNEL_DIR", str(tmp_path / "kernels"))
    cpu_fast.kernel.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = cpu_fast.kernel()
        if not list((tmp_path / "kernels").glob("*.so")):
            pytest.skip("no C compiler on this machine")
        assert result is None
        assert any("differs from PyTorch's attention" in str(w.message) for w in caught)
    finally:
        cpu_fast.kernel.cache_clear()


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("DALLE_CPU_KERNEL", "0")
    cpu_fast.kernel.cache_clear()
    try:
        assert cpu_fast.kernel() is None
    finally:
        cpu_fast.kernel.cache_clear()


def test_fast_copy_leaves_the_model_alone_and_fp32_shares_its_weights(attend):
    model, _ = _model()
    for precision in ("fp32", "bf16"):
        twin, _, cache_dtype = cpu_fast.for_sampling(model, precision, rows=4)
        assert twin is not model and all(isinstance(b.attn, cpu_fast.DecodeAttention) for b in twin.blocks)
        assert not any(isinstance(m, (cpu_fast.DecodeAttention, cpu_fast.PackedLinear)) for m in model.modules())
        assert cache_dtype == (torch.float32 if precision == "fp32" else torch.bfloat16)
    fp32_twin, _, _ = cpu_fast.for_sampling(model, "fp32", rows=4)
    assert all(a is b for a, b in zip(fp32_twin.parameters(), model.parameters()))


def test_bf16_attention_in_fp32_tracks_fp32_and_the_limit_can_be_set():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 40, 16, generator=g) for _ in range(3))
    expect = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    bf16 = [t.to(torch.bfloat16) for t in (q, k, v)]
    in_fp32 = cpu_fast.causal_attention(*bf16)
    with cpu_fast.fp32_attention_up_to(0):
        in_bf16 = cpu_fast.causal_attention(*bf16)
    assert in_fp32.dtype == in_bf16.dtype == torch.bfloat16
    assert not torch.equal(in_fp32, in_bf16)
    assert torch.allclose(in_fp32.float(), expect, atol=0.02) and torch.allclose(in_bf16.float(), expect, atol=0.05)
    assert torch.equal(cpu_fast.causal_attention(*bf16), in_fp32)  # the shipped limit is back
