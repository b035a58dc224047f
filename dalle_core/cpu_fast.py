"""The CPU's fast paths for training and sampling the transformer, kept apart so the model and the sampler read as
the algorithm. Every path computes what the plain one does, up to rounding (docs/benchmarks.md has the gains).

- Training attention in bf16 (`causal_attention`, `bf16_attention_kernel`): which SDPA kernel and precision.
- Sampling (`for_sampling`): a copy of the model whose linear layers are bf16 and packed once for oneDNN
  (`PackedLinear`), and whose one-token steps run a compiled attention fused with its KV-cache write
  (`DecodeAttention` over `kernel()`).

The compiled attention is `decode_attention.c`, built once per machine with the system C compiler (`$CC`, else
`cc`) and loaded with ctypes; where there is no compiler, or the build or its self-check fails, `kernel()` is None
and sampling uses PyTorch's attention over an fp32 cache (one warning says why). DALLE_CPU_KERNEL=0 turns it off.
The built library is cached under $DALLE_KERNEL_DIR (default ~/.cache/dalle_core), named by a hash of the source,
the compiler and the CPU's flags, since it is built for this CPU (-march=native).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import ctypes
import functools
import hashlib
import itertools
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# ------------------------------------------------------------------ training: bf16 attention

# bf16 attention over at most this many tokens runs in fp32: the flash kernel is faster in fp32 there
CPU_FP32_ATTENTION_MAX_LEN = 640
# bf16 attention over at most this many tokens (CLIP's) uses SDPA's math kernel: faster there
CPU_BF16_MATH_MAX_LEN = 200

_fp32_attention_max_len = contextvars.ContextVar("fp32_attention_max_len", default=CPU_FP32_ATTENTION_MAX_LEN)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal SDPA of (B, nh, T, hs) q, k, v on a CPU -> (B, nh, T, hs) in q's dtype. bf16 inputs over at most
    CPU_FP32_ATTENTION_MAX_LEN tokens (see `fp32_attention_up_to`) are attended in fp32 on the flash kernel and the
    result cast back; anything else is plain SDPA."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or q.shape[2] > _fp32_attention_max_len.get():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    with torch.autocast("cpu", enabled=False), sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, dropout_p=dropout_p)
    return y.to(torch.bfloat16)


@contextlib.contextmanager
def fp32_attention_up_to(max_len: int) -> Iterator[None]:
    """Within it, `causal_attention` attends bf16 inputs in fp32 up to `max_len` tokens instead of
    CPU_FP32_ATTENTION_MAX_LEN (0: never), in this thread or task only: for measuring the alternatives."""
    token = _fp32_attention_max_len.set(max_len)
    try:
        yield
    finally:
        _fp32_attention_max_len.reset(token)


def bf16_attention_kernel(seq_len: int | None) -> contextlib.AbstractContextManager:
    """The SDPA kernel choice for bf16 autocast on a CPU when the model attends over at most `seq_len` tokens
    (None: short): the math kernel up to CPU_BF16_MATH_MAX_LEN, PyTorch's own choice above."""
    if seq_len is None or seq_len <= CPU_BF16_MATH_MAX_LEN:
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


# ------------------------------------------------------------------ sampling: the compiled decode attention

SOURCE = Path(__file__).with_name("decode_attention.c")
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine


def _build(cc: str) -> Path:
    source = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(),
                                     _cpu_flags().encode()])).hexdigest()[:16]
    root = Path(os.environ.get("DALLE_KERNEL_DIR") or Path.home() / ".cache" / "dalle_core")
    lib = root / f"decode_attention-{key}.so"
    if lib.exists():
        return lib
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:  # build beside the target, then rename: atomic
        built = Path(tmp) / lib.name
        run = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], capture_output=True,
                             text=True, timeout=120)
        if run.returncode:
            raise RuntimeError(f"{cc} failed: {run.stderr.strip().splitlines()[-1:] or run.returncode}")
        os.replace(built, lib)
    return lib


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name in ("dalle_decode_step_bf16", "dalle_decode_step_f32"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3 + [ctypes.c_long] * 2
    return lib


class DecodeStep:
    """step(qkv, k_cache, v_cache, n): one sampling step's attention. qkv (B, 1, 3 * dim), the fused projection of
    this step's token; k_cache, v_cache one layer's cache (B, nh, L, hs), contiguous, fp32 or bf16. Writes this
    step's keys and values at position n - 1, and returns (B, 1, dim) in the cache's dtype: softmax(q k^T /
    sqrt(hs)) v over positions 0 .. n-1, heads side by side."""

    def __init__(self, lib: ctypes.CDLL):
        self._fns = {torch.bfloat16: lib.dalle_decode_step_bf16, torch.float32: lib.dalle_decode_step_f32}

    def __call__(self, qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n: int) -> torch.Tensor:
        B, nh, L, hs = k_cache.shape
        assert k_cache.is_contiguous() and v_cache.is_contiguous() and v_cache.dtype == k_cache.dtype
        assert qkv.shape == (B, 1, 3 * nh * hs) and 1 <= n <= L and k_cache.device.type == "cpu"
        qkv = qkv.to(k_cache.dtype).contiguous()
        out = torch.empty(B, 1, nh * hs, dtype=k_cache.dtype)
        if self._fns[k_cache.dtype](qkv.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), B, nh,
                                    hs, n, L):
            raise MemoryError(f"the decode step could not allocate {n} attention scores a thread")
        return out


def _self_check(step: DecodeStep) -> None:
    """The built kernel against PyTorch's attention, on every dtype and a head size of each code path."""
    rng = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        for hs in (32, 24):
            k, v = (torch.randn(2, 3, 9, hs, generator=rng).to(dtype) for _ in range(2))
            qkv = torch.randn(2, 1, 3 * 3 * hs, generator=rng).to(dtype)
            q, k_new, v_new = (t.view(2, 3, 1, hs) for t in qkv.float().split(3 * hs, dim=2))
            expect = F.scaled_dot_product_attention(
                q, torch.cat([k[:, :, :6].float(), k_new], 2), torch.cat([v[:, :, :6].float(), v_new], 2))
            out = step(qkv, k, v, 7).float().view(2, 3, hs)
            if not torch.allclose(out, expect.view(2, 3, hs), atol=1e-5 if dtype == torch.float32 else 1e-2):
                raise RuntimeError(f"its output differs from PyTorch's attention ({dtype}, head size {hs})")
            if not (torch.equal(k[:, :, 6:7].float(), k_new) and torch.equal(v[:, :, 6:7].float(), v_new)):
                raise RuntimeError(f"it wrote the wrong keys or values to the cache ({dtype}, head size {hs})")


@functools.cache
def kernel() -> DecodeStep | None:
    """The compiled decode step, or None where it is off or cannot be built here (with one warning saying why)."""
    if os.environ.get("DALLE_CPU_KERNEL", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    try:
        if cc is None:
            raise RuntimeError("no C compiler (set CC, or install gcc)")
        step = DecodeStep(_load(_build(cc)))
        _self_check(step)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"CPU sampling uses PyTorch's attention over an fp32 cache, which is slower "
                      f"(docs/benchmarks.md): the compiled decode attention is unavailable: {e}", stacklevel=2)
        return None
    return step


class DecodeAttention(nn.Module):
    """Wraps a `CausalSelfAttention`: its one-token steps over a KV cache run the compiled decode step (the cache
    write and the attention in one call, on the fused q/k/v projection); everything else is the wrapped module."""

    def __init__(self, attn: nn.Module, step: DecodeStep):
        super().__init__()
        self.attn, self.step = attn, step

    def forward(self, x: torch.Tensor, cache=None, layer: int = 0, pos: int = 0) -> torch.Tensor:
        if cache is None or x.shape[1] != 1:
            return self.attn(x, cache, layer, pos)
        y = self.step(self.attn.qkv(x), cache.k[layer], cache.v[layer], pos + 1)  # (B, 1, dim), heads side by side
        return self.attn.resid_drop(self.attn.proj(y))


# ------------------------------------------------------------------ sampling: packed bf16 linear layers


class PackedLinear(nn.Module):
    """A bf16 linear layer (optionally with its GELU) on the CPU, its weight packed once for oneDNN: F.linear
    re-packs the weight at every call, as costly as the product itself at a sampling step's few rows
    (docs/benchmarks.md). Inference only; its input is cast to bf16, its output is bf16. `rows`: the batch rows
    the packing is tuned for."""

    def __init__(self, linear: nn.Linear, rows: int, gelu: bool = False):
        super().__init__()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().to(torch.bfloat16), rows)
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.post_op, self.algorithm = ("gelu", "tanh") if gelu else ("none", "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.weight, self.bias, self.post_op, [],
                                                  self.algorithm)


@functools.cache
def packed_linear_works() -> bool:
    """Whether this PyTorch build has oneDNN's packed bf16 linear (a private op) and it computes F.linear."""
    try:
        with torch.inference_mode(), torch.random.fork_rng(devices=[]):  # leaves the caller's RNG stream as it was
            linear = nn.Linear(16, 8)
            x = torch.randn(3, 2, 16).to(torch.bfloat16)
            expect = F.gelu(F.linear(x, linear.weight.to(torch.bfloat16), linear.bias.to(torch.bfloat16)).float(),
                            approximate="tanh")
            return torch.allclose(PackedLinear(linear, 8, gelu=True)(x).float(), expect, atol=0.05)
    except (RuntimeError, AttributeError):
        return False


# ------------------------------------------------------------------ sampling: the fast copy


def for_sampling(model: nn.Module, precision: str,
                 rows: int) -> tuple[nn.Module, contextlib.AbstractContextManager, torch.dtype]:
    """A DALLE on the CPU -> the model to sample `rows` rows with, the context to run it in, and its KV cache's
    dtype, for `precision` fp32 or bf16. The model passed in is never changed.

    Each one-token step's attention is the compiled kernel where it builds (`DecodeAttention`), over a bf16 cache
    under bf16 (half the bytes a step reads, which bound it); without it, PyTorch's over an fp32 cache, since its
    CPU attention is much slower over a bf16 cache. bf16: a copy whose linear layers are bf16, packed once for
    oneDNN (`PackedLinear`, the GELU fused into the MLP's first; plain bf16 linears where this build lacks the
    op), run under bf16 autocast. fp32 with the kernel: a copy sharing the model's weights.
    """
    step = kernel()
    if precision != "bf16":
        if step is None:
            return model, contextlib.nullcontext(), torch.float32
        shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
        return _with_decode_attention(copy.deepcopy(model, shared), step), contextlib.nullcontext(), torch.float32
    twin = copy.deepcopy(model)
    packed = packed_linear_works()
    for block in twin.blocks if packed else []:
        block.mlp.fc, block.mlp.gelu = PackedLinear(block.mlp.fc, rows, gelu=True), nn.Identity()
    for parent in [*twin.modules()]:
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child, rows) if packed else child.to(torch.bfloat16))
    if step is not None:
        twin = _with_decode_attention(twin, step)
    return twin, torch.autocast("cpu", dtype=torch.bfloat16), torch.float32 if step is None else torch.bfloat16


def _with_decode_attention(model: nn.Module, step: DecodeStep) -> nn.Module:
    for block in model.blocks:
        block.attn = DecodeAttention(block.attn, step)
    return model
