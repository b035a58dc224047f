"""A compiled attention for one sampling step on the CPU, fused with its KV-cache write, over a bf16 or fp32 cache.

`decode_attention.c` is built once per machine with the system C compiler (`$CC`, else `cc`) and loaded
with ctypes; where there is no compiler, or the build or its self-check fails, `kernel()` is None and
sampling uses PyTorch's attention over an fp32 cache (one warning says why). DALLE_CPU_KERNEL=0 turns it
off. The built library is cached under $DALLE_KERNEL_DIR (default ~/.cache/dalle_core), named by a hash
of the source, the compiler and the CPU's flags, since it is built for this CPU (-march=native).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

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
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        for hs in (32, 24):
            k, v = (torch.randn(2, 3, 9, hs, generator=g).to(dtype) for _ in range(2))
            qkv = torch.randn(2, 1, 3 * 3 * hs, generator=g).to(dtype)
            q, k_new, v_new = (t.view(2, 3, 1, hs) for t in qkv.float().split(3 * hs, dim=2))
            expect = torch.nn.functional.scaled_dot_product_attention(
                q, torch.cat([k[:, :, :6].float(), k_new], 2), torch.cat([v[:, :, :6].float(), v_new], 2))
            out = step(qkv, k, v, 7).float().view(2, 3, hs)
            if not torch.allclose(out, expect.view(2, 3, hs), atol=1e-5 if dtype == torch.float32 else 1e-2):
                raise RuntimeError(f"its output differs from PyTorch's attention ({dtype}, head size {hs})")
            if not (torch.equal(k[:, :, 6:7].float(), k_new) and torch.equal(v[:, :, 6:7].float(), v_new)):
                raise RuntimeError(f"it wrote the wrong keys or values to the cache ({dtype}, head size {hs})")


@functools.cache
def kernel() -> DecodeStep | None:
    """The compiled decode step, or None where it is off or cannot be built here."""
    if os.environ.get("DALLE_CPU_KERNEL", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    try:
        if cc is None:
            raise RuntimeError("no C compiler (set CC, or install gcc)")
        step = DecodeStep(_load(_build(cc)))
        _self_check(step)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"CPU sampling uses PyTorch's attention over an fp32 cache, about 1.6x slower at "
                      f"DALL-E's shape: the compiled decode attention is unavailable: {e}", stacklevel=2)
        return None
    return step
