"""Native CPU kernels for the fast path: `native_kernels.c`, compiled on first use.

Several steps of a GRPO step on CPU are chains of small torch operators that cost more in
dispatch and trips through memory than in arithmetic: the decode step's attention (rotary
embedding of the new query and key, the cache write, softmax(q k^T) v over the cache), RMSNorm,
SwiGLU and the rotary embedding with their backward passes, and the LoRA dropout (a dropped copy
of x per projection). The C kernels do each in one pass, with OpenMP threads.

The source is compiled with the system C compiler (`$CC`, else `cc` or `gcc`; `-O3 -march=native
-fopenmp`) into `$GRPO_NATIVE_CACHE` (default `~/.cache/grpo-pipeline/native`), keyed by the
source, the compiler and the CPU (the machine and its cpuinfo: model and flags on x86;
implementer, part and features on ARM), once per machine (well under a second), then loaded with
ctypes. It links the OpenMP runtime by its soname, so it shares the one torch has loaded. Where
anything of this is missing (no compiler, not Linux, a failed build or self-check) `kernels()`
returns None, says why once in the log, and callers keep their torch path. `GRPO_NATIVE=0`
turns the kernels off.

The cache only ever runs the user's own build:
- The folder is created 0700; one that is a symlink, not this user's, or writable by group or
  others is refused (the kernels stay off, as without a compiler). It is checked as opened, and
  the library and its record are then read, written and renamed through that descriptor.
- A build is written under a fresh name (0700) and renamed into place; then its sha256 goes into
  the sidecar `<library>.sha256` (0600; `sha256sum`'s format), written and renamed likewise.
- A library is loaded only after its bytes, read through one descriptor, match its sidecar; the
  loader then opens that descriptor (`/proc/self/fd/N`), the very file hashed. A library without
  a record or with another hash is not loaded but rebuilt; a rebuild that fails the check too
  turns the kernels off.

Kernels (float32 CPU tensors; see the C source for each):
- `decode_attention`: a decode step's rotary embedding, cache write and attention.
- `swiglu` / `swiglu_backward`: silu(gate) * up and its gradients, one pass each.
- `rms_norm` / `rms_norm_backward`: RMSNorm and its input gradient, one pass each.
- `rotary`: the rotary embedding (or its transpose, the backward) in one pass.
- `lora_drop_xa` / `lora_drop_backward`: LoRA dropout as corrections of the undropped products,
  at the dropped entries only.
- `attention` / `attention_backward`: attention over whole sequences (the log-prob passes),
  reading each row's prompt keys/values in place.
- `dropped_positions`: the positions LoRA dropout drops, from one seed.
- `sample_inverse_cdf`: a decode step's token draw (softmax, cumulative mass, search) in one pass.

`mkl_gemm()` is the other native path: MKL's packed GEMM (`cblas_sgemm_pack` /
`cblas_sgemm_compute`) from the MKL that torch's CPU library carries, for the decode step's
products with weights that stay fixed through a generation (packed once per generation, not
repacked by every call). It returns None where torch has no MKL.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import hmac
import logging
import math
import os
import platform
import secrets
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native_kernels.c")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared", "-std=gnu99")


class NativeKernels:
    """The loaded library with typed wrappers."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        ptr, i64, i32, f32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
        self._attention = self._typed(
            lib.grpo_decode_attention, [ptr] * 8 + [i32, i32, ptr, ptr, i32, i32, ptr] + [i32] * 4 + [f32, i32]
        )
        self._attention.restype = i32
        self._swiglu = self._typed(lib.grpo_swiglu, [ptr, ptr, i64, ptr, i64, i32, i32])
        self._swiglu_backward = self._typed(lib.grpo_swiglu_backward, [ptr] * 5 + [i64, i32, i32])
        self._rms_norm = self._typed(lib.grpo_rms_norm, [ptr] * 4 + [i64, i32, f32, i32])
        self._rms_norm_backward = self._typed(lib.grpo_rms_norm_backward, [ptr] * 5 + [i64, i32, i32])
        self._rotary = self._typed(lib.grpo_rotary, [ptr, i64, i64, i64, ptr, ptr, ptr, i64, i64, i32, i32, i32, i32])
        self._drop_xa = self._typed(lib.grpo_lora_drop_xa, [ptr, i64, ptr, i64, ptr, i32, ptr, i64, i32])
        self._drop_backward = self._typed(
            lib.grpo_lora_drop_backward, [ptr, ptr, i64, ptr, i64, ptr, i64, ptr, i32, ptr, i32]
        )
        heads = [ptr, i64, i64, i64]  # a tensor of heads and its (row, head, position) strides
        self._attn = self._typed(
            lib.grpo_attention, heads * 3 + [ptr, i32, i32] + heads * 2 + [ptr] * 5 + [i32] * 6 + [f32, i32]
        )
        self._attn.restype = i32
        self._attn_backward = self._typed(
            lib.grpo_attention_backward,
            heads + [ptr] + heads * 3 + [ptr, i32, i32] + heads * 2 + [ptr] * 7 + [i32] * 6 + [f32, i32],
        )
        self._attn_backward.restype = i32
        self._decode_step = self._typed(
            lib.grpo_decode_step,
            [ptr, i32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, i32, i32, i32, ptr, ptr, ptr] + [i32] * 7
            + [f32, f32, ptr, ptr, i32],
        )  # fmt: skip
        self._decode_step.restype = i32
        self._sample = self._typed(lib.grpo_sample_inverse_cdf, [ptr, ptr, f32, ptr, ptr, i32, i32, i32])
        self._sample.restype = i32
        self._dropped_positions = self._typed(lib.grpo_dropped_positions, [ctypes.c_uint64, i64, f32, ptr, i64])
        self._dropped_positions.restype = i64

    @staticmethod
    def _typed(f: Any, argtypes: list[Any]) -> Any:
        f.restype, f.argtypes = None, argtypes
        return f

    @staticmethod
    def runs_on(*tensors: Tensor) -> bool:
        """True when every tensor is a float32 CPU tensor whose last dim is contiguous."""
        return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.stride(-1) == 1 for t in tensors)

    def swiglu(self, gate: Tensor, up: Tensor) -> Tensor:
        """silu(gate) * up -> a new contiguous tensor; gate and up (..., W) may be strided views
        (e.g. the halves of one (..., 2W) tensor) with the same row stride."""
        width = gate.shape[-1]
        rows = gate.numel() // width
        stride = gate.stride(-2) if gate.dim() > 1 else width
        if up.shape != gate.shape or (gate.dim() > 1 and up.stride(-2) != stride) or not _rows_uniform(gate):
            raise ValueError("swiglu: gate and up need one shape and one row stride")
        out = torch.empty(gate.shape, dtype=gate.dtype)
        self._swiglu(gate.data_ptr(), up.data_ptr(), stride, out.data_ptr(), rows, width, torch.get_num_threads())
        return out

    def swiglu_backward(self, grad: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
        """(d gate, d up) of silu(gate) * up for contiguous tensors of one shape."""
        grad, gate, up = grad.contiguous(), gate.contiguous(), up.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        width = gate.shape[-1]
        self._swiglu_backward(
            grad.data_ptr(), gate.data_ptr(), up.data_ptr(), dgate.data_ptr(), dup.data_ptr(),
            gate.numel() // width, width, torch.get_num_threads(),
        )  # fmt: skip
        return dgate, dup

    def rotary(self, x: Tensor, cos: Tensor, signed_sin: Tensor, *, transpose: bool = False) -> Tensor:
        """x cos + rotate_half(x) sin for x (n, H, L, D) (any strides, D contiguous) and cos,
        signed_sin (n, 1, L, D) contiguous -> a new (n, H, L, D) tensor laid out as (n, L, H, D)."""
        n, heads, length, d = x.shape
        if cos.shape != (n, 1, length, d) or signed_sin.shape != cos.shape or not cos.is_contiguous():
            raise ValueError("rotary: cos and signed_sin must be contiguous (n, 1, L, D)")
        if not signed_sin.is_contiguous() or x.stride(3) != 1 or d % 2:
            raise ValueError("rotary: x needs a contiguous last dim of even size")
        out = torch.empty(n, length, heads, d, dtype=x.dtype)
        self._rotary(
            x.data_ptr(), x.stride(0), x.stride(2), x.stride(1), cos.data_ptr(), signed_sin.data_ptr(),
            out.data_ptr(), n, length, heads, d, int(transpose), torch.get_num_threads(),
        )  # fmt: skip
        return out.transpose(1, 2)

    MAX_LORA_RANK = 64  # the dropout corrections' per-row accumulator

    @staticmethod
    def _check_drops(x: Tensor, drops: Tensor, xa: Tensor, a_t: Tensor) -> None:
        if not (x.is_contiguous() and drops.dtype == torch.int64 and drops.is_contiguous() and a_t.is_contiguous()):
            raise ValueError("lora dropout corrections: x, drops (int64) and a_t must be contiguous")
        if xa.dim() != 2 or xa.stride(1) != 1 or xa.shape[0] != x.shape[0] or a_t.shape != (x.shape[1], xa.shape[1]):
            raise ValueError("lora dropout corrections: shapes do not agree")
        if xa.shape[1] > NativeKernels.MAX_LORA_RANK:
            raise ValueError(f"lora dropout corrections: rank {xa.shape[1]} > {NativeKernels.MAX_LORA_RANK}")

    def lora_drop_xa(self, x: Tensor, drops: Tensor, a_t: Tensor, xa: Tensor) -> None:
        """xa (M, R) = x A^T becomes dropout(x) A^T (without the 1 / (1 - p)), in place: x (M, in)
        contiguous, drops (k,) ascending flat positions of x's dropped entries, a_t = A^T (in, R)."""
        self._check_drops(x, drops, xa, a_t)
        self._drop_xa(
            x.data_ptr(), x.shape[1], drops.data_ptr(), drops.numel(), a_t.data_ptr(), a_t.shape[1],
            xa.data_ptr(), xa.stride(0), torch.get_num_threads(),
        )  # fmt: skip

    def lora_drop_backward(self, x: Tensor, drops: Tensor, gxa: Tensor, a_t: Tensor, gx: Tensor | None) -> Tensor:
        """The dropped entries' part of x^T gxa, (in, R), to subtract from it for dropout(x)^T gxa;
        and, when gx (M, in) is given, which holds gxa A among its terms, that term removed at the
        dropped entries (in place)."""
        corr = torch.zeros(x.shape[1], gxa.shape[1], dtype=x.dtype)
        self._check_drops(x, drops, gxa, a_t)
        if gx is not None and (gx.shape != x.shape or not gx.is_contiguous()):
            raise ValueError("lora dropout corrections: gx must be contiguous, shaped as x")
        self._drop_backward(
            x.data_ptr(), gx.data_ptr() if gx is not None else None, x.shape[1], drops.data_ptr(), drops.numel(),
            gxa.data_ptr(), gxa.stride(0), a_t.data_ptr(), a_t.shape[1], corr.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return corr

    @staticmethod
    def _heads_args(t: Tensor | None) -> tuple[int | None, ...]:
        """data pointer and the (row, head, position) strides of a (n, heads, L, D) tensor."""
        if t is None:
            return None, 0, 0, 0
        return t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)

    def _check_attention(
        self, q: Tensor, k: Tensor, v: Tensor, prefix: tuple[Tensor, Tensor, Tensor] | None,
        rope: tuple[Tensor, Tensor] | None,
    ) -> tuple[int, int, int]:  # fmt: skip
        """(Hkv, prompt keys P, whole span S) of an attention call; ValueError where it cannot run."""
        n, hq, length, d = q.shape
        hkv, plen = k.shape[1], 0
        if prefix is not None:
            pk, pv, prompt_of = prefix
            plen = pk.shape[2]
            if pk.shape != (pk.shape[0], hkv, plen, d) or pv.shape != pk.shape or prompt_of.shape != (n,):
                raise ValueError("attention: prompt keys/values (U, Hkv, P, D) and one prompt index per row")
            if prompt_of.dtype != torch.int64 or not prompt_of.is_contiguous() or not self.runs_on(pk, pv):
                raise ValueError("attention: float32 CPU prompt keys/values, contiguous int64 prompt indices")
        if k.shape != (n, hkv, k.shape[2], d) or v.shape != k.shape or hq % hkv or d % 16:
            raise ValueError("attention: q (n, Hq, L, D), k and v (n, Hkv, S, D) with Hkv | Hq and 16 | D")
        if not self.runs_on(q, k, v):
            raise ValueError("attention: float32 CPU tensors, D contiguous")
        if rope is not None:
            cos, signed_sin = rope
            if k.shape[2] != length or cos.shape != (n, length, d) or signed_sin.shape != cos.shape:
                raise ValueError("attention: rotary tables (n, L, D) for L queries and as many own keys")
            if not (self.runs_on(cos, signed_sin) and cos.is_contiguous() and signed_sin.is_contiguous()):
                raise ValueError("attention: contiguous float32 CPU rotary tables")
        return hkv, plen, plen + k.shape[2]

    @staticmethod
    def _rope_args(rope: tuple[Tensor, Tensor] | None) -> tuple[int | None, int | None]:
        return (rope[0].data_ptr(), rope[1].data_ptr()) if rope is not None else (None, None)

    def attention(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, *, keep_probs: bool,
        prefix: tuple[Tensor, Tensor, Tensor] | None = None, rope: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        """softmax(q k^T / sqrt(D) + mask) v for q (n, Hq, L, D), k, v (n, Hkv, S, D) (any strides,
        D contiguous, D a multiple of 16), mask (n, 1, L, P + S) additive -> (out (n, Hq, L, D), a
        view of an (n, L, Hq, D) tensor; the softmax (n, Hkv, Hq / Hkv L, P + S) when
        `keep_probs`). `prefix` = (prompt keys, prompt values (U, Hkv, P, D), prompt_of (n,)
        int64): row i's first P keys/values are those of prompt prompt_of[i]. `rope` = (cos,
        signed_sin) (n, L, D): q and k (then S = L) come unrotated and are rotated here."""
        n, hq, length, d = q.shape
        hkv, plen, span = self._check_attention(q, k, v, prefix, rope)
        if mask.shape != (n, 1, length, span) or not mask.is_contiguous() or not self.runs_on(mask):
            raise ValueError("attention: the mask must be a contiguous float32 (n, 1, L, P + S)")
        pk, pv, prompt_of = prefix if prefix is not None else (None, None, None)
        out = torch.empty(n, length, hq, d, dtype=q.dtype)
        probs = torch.empty(n, hkv, hq // hkv * length, span, dtype=q.dtype) if keep_probs else None
        done = self._attn(
            *self._heads_args(q), *self._heads_args(pk), *self._heads_args(pv),
            prompt_of.data_ptr() if prompt_of is not None else None, pk.shape[0] if pk is not None else 0, plen,
            *self._heads_args(k), *self._heads_args(v), *self._rope_args(rope), mask.data_ptr(), out.data_ptr(),
            probs.data_ptr() if probs is not None else None, n, hq, hkv, length, span, d, d**-0.5,
            torch.get_num_threads(),
        )  # fmt: skip
        if done != 0:
            raise ValueError("attention: prompt_of holds an index outside the prompts")
        return out.transpose(1, 2), probs

    def attention_backward(
        self, grad: Tensor, probs: Tensor, q: Tensor, k: Tensor, v: Tensor,
        prefix: tuple[Tensor, Tensor, Tensor] | None = None, rope: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:  # fmt: skip
        """(dq, dk, dv, dpk, dpv) of `attention` from its output's gradient grad (n, Hq, L, D)
        and the kept softmax; dq is a view of an (n, L, Hq, D) tensor; dk, dv (n, Hkv, S, D)
        and, with a prefix, dpk, dpv (n, Hkv, P, D) for each row's prompt keys/values (rows of
        one prompt to be summed), else None. With `rope`, dq and dk are the unrotated q's and k's."""
        n, hq, length, d = q.shape
        hkv, plen, span = self._check_attention(q, k, v, prefix, rope)
        if grad.shape != q.shape or probs.shape != (n, hkv, hq // hkv * length, span) or not probs.is_contiguous():
            raise ValueError("attention_backward: grad shaped as q, probs as `attention` keeps them")
        if not self.runs_on(grad, probs):
            raise ValueError("attention_backward: float32 CPU tensors, D contiguous")
        pk, pv, prompt_of = prefix if prefix is not None else (None, None, None)
        dq = torch.empty(n, length, hq, d, dtype=q.dtype)
        dk, dv = (torch.empty(n, hkv, span - plen, d, dtype=q.dtype) for _ in range(2))
        dpk, dpv = (None, None)
        if prefix is not None:
            dpk, dpv = (torch.empty(n, hkv, plen, d, dtype=q.dtype) for _ in range(2))
        done = self._attn_backward(
            *self._heads_args(grad), probs.data_ptr(), *self._heads_args(q), *self._heads_args(pk),
            *self._heads_args(pv), prompt_of.data_ptr() if prompt_of is not None else None,
            pk.shape[0] if pk is not None else 0, plen, *self._heads_args(k), *self._heads_args(v),
            *self._rope_args(rope), dq.data_ptr(), dpk.data_ptr() if dpk is not None else None,
            dpv.data_ptr() if dpv is not None else None, dk.data_ptr(), dv.data_ptr(), n, hq, hkv, length, span, d,
            d**-0.5, torch.get_num_threads(),
        )  # fmt: skip
        if done != 0:
            raise ValueError("attention_backward: prompt_of holds an index outside the prompts")
        return dq.transpose(1, 2), dk, dv, dpk, dpv

    def sample_inverse_cdf(self, logits: Tensor, bias: Tensor | None, temperature: float, u: Tensor) -> Tensor:
        """One token per row (N,) int64 drawn from softmax((logits + bias) / temperature) by inverse
        CDF with the uniforms u (N, 1) float64: `grpo.rollout.pick_tokens`' inverse_cdf sampler
        (no top-k / top-p) in one pass. logits (N, V) contiguous float32, bias (V,) or None."""
        n, v = logits.shape
        if not (self.runs_on(logits) and logits.is_contiguous()) or (bias is not None and bias.shape != (v,)):
            raise ValueError("sample_inverse_cdf: contiguous float32 CPU logits (N, V), bias (V,) or None")
        if u.shape != (n, 1) or u.dtype != torch.float64 or not u.is_contiguous() or u.device.type != "cpu":
            raise ValueError("sample_inverse_cdf: u must be contiguous float64 CPU (N, 1)")
        bias = bias.contiguous() if bias is not None else None
        out = torch.empty(n, dtype=torch.int64)
        empty = self._sample(
            logits.data_ptr(), bias.data_ptr() if bias is not None else None, temperature, u.data_ptr(), out.data_ptr(),
            n, v, torch.get_num_threads(),
        )  # fmt: skip
        if empty:
            raise ValueError(f"sample_inverse_cdf: {empty} row(s) give every token zero probability (all -inf or NaN)")
        return out

    def dropped_positions(self, n: int, p: float, seed: int) -> Tensor:
        """Ascending flat positions (k,) int64 of the entries that dropout with drop probability
        p (0 < p < 1) zeroes among n: a function of `seed` (any int, taken mod 2^64)."""
        if not 0.0 < p < 1.0:
            raise ValueError(f"dropped_positions: p is {p}; it must be in (0, 1)")
        mean = n * p
        for cap in (int(mean + 6 * math.sqrt(mean) + 16), n):
            out = torch.empty(cap, dtype=torch.int64)
            k = self._dropped_positions(seed % 2**64, n, 1.0 / math.log1p(-p), out.data_ptr(), cap)
            if k >= 0:
                return out[:k]
        raise AssertionError("unreachable: n positions always fit")

    def rms_norm(
        self, x: Tensor, weight: Tensor, eps: float, *, with_rstd: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """(x r w, r (..., 1) or None), r = 1 / sqrt(mean(x^2) + eps) over the last dim."""
        x = x.contiguous()
        h = x.shape[-1]
        out = torch.empty_like(x)
        rstd = torch.empty(*x.shape[:-1], 1, dtype=x.dtype) if with_rstd else None
        self._rms_norm(
            x.data_ptr(), weight.contiguous().data_ptr(), out.data_ptr(), rstd.data_ptr() if rstd is not None else None,
            x.numel() // h, h, eps, torch.get_num_threads(),
        )  # fmt: skip
        return out, rstd

    def rms_norm_backward(self, grad: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> Tensor:
        """The input gradient of `rms_norm` (weight frozen)."""
        grad, x = grad.contiguous(), x.contiguous()
        dx = torch.empty_like(x)
        h = x.shape[-1]
        self._rms_norm_backward(
            grad.data_ptr(), x.data_ptr(), weight.contiguous().data_ptr(), rstd.contiguous().data_ptr(),
            dx.data_ptr(), x.numel() // h, h, torch.get_num_threads(),
        )  # fmt: skip
        return dx

    def decode_attention(
        self,
        qkv: Tensor,
        bias: Tensor,
        cos: Tensor,
        signed_sin: Tensor,
        prompt_k: Tensor,
        prompt_v: Tensor,
        prompt_mask: Tensor,
        prompt_of: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        out: Tensor,
        slot: int,
        scale: float,
    ) -> Tensor:
        """One decode step: qkv (N, (Hq + 2 Hkv) D) without its bias ((Hq + 2 Hkv) D,), cos /
        signed_sin (N, D); the keys/values of
        the U distinct prompts (U, Hkv, P, D) with their additive mask (U, P) and each row's
        prompt `prompt_of` (N,) int64; the generated keys/values (N, Hkv, S, D), slot `slot`
        written -> out (N, Hq D): attention over the row's prompt and generated slots 0..slot."""
        n, hkv, span, d = k_cache.shape
        u, plen = prompt_mask.shape
        hq = out.shape[1] // d
        tensors = (qkv, bias, cos, signed_sin, prompt_k, prompt_v, prompt_mask, k_cache, v_cache, out)
        if (
            qkv.shape != (n, (hq + 2 * hkv) * d)
            or bias.shape != qkv.shape[1:]
            or v_cache.shape != k_cache.shape
            or prompt_k.shape != (u, hkv, plen, d)
            or prompt_v.shape != prompt_k.shape
            or prompt_of.shape != (n,)
            or cos.numel() != n * d
            or signed_sin.numel() != n * d
            or not 0 <= slot < span
        ):
            raise ValueError("decode_attention: shapes do not agree")
        if not (self.runs_on(*tensors) and all(t.is_contiguous() for t in tensors)):
            raise ValueError("decode_attention: needs contiguous float32 CPU tensors")
        if prompt_of.dtype != torch.int64 or not prompt_of.is_contiguous() or prompt_of.device.type != "cpu":
            raise ValueError("decode_attention: prompt_of must be a contiguous int64 CPU tensor")
        done = self._attention(
            qkv.data_ptr(), bias.data_ptr(), cos.data_ptr(), signed_sin.data_ptr(), prompt_k.data_ptr(),
            prompt_v.data_ptr(), prompt_mask.data_ptr(), prompt_of.data_ptr(), u, plen,
            k_cache.data_ptr(), v_cache.data_ptr(), span, slot,
            out.data_ptr(), n, hq, hkv, d, scale, torch.get_num_threads(),
        )  # fmt: skip
        if done != 0:
            raise ValueError(f"decode_attention: prompt_of holds an index outside 0..{u - 1}")
        return out


class DecodeLayer(ctypes.Structure):
    """One layer's tensors for `grpo_decode_step` (the C struct decode_layer)."""

    _fields_ = [
        (name, ctypes.c_void_p)
        for name in (
            "ln1", "ln2", "qkv", "o", "gate_up", "down", "qkv_bias", "prompt_k", "prompt_v", "k_cache", "v_cache"
        )
    ]


class DecodeStep:
    """A generation's whole decode step in one native call (`NativeKernels.decode_step`): the
    token embedding, every layer (RMSNorm, MKL-packed products, attention with its cache write,
    SwiGLU) and the final norm and head. Shapes are checked once, here; the buffers are its own."""

    def __init__(
        self, kernels: NativeKernels, gemm: MklGemm, layers: list[dict[str, Any]], embed: Tensor, norm: Tensor,
        head: PackedMatrix, prompt_mask: Tensor, prompt_of: Tensor, dims: dict[str, int], eps: float,
    ) -> None:  # fmt: skip
        n, h, inter, hq, hkv, d = (dims[k] for k in ("n", "h", "inter", "hq", "hkv", "d"))
        u, plen = prompt_mask.shape
        span = layers[0]["k_cache"].shape[2]
        for lay in layers:
            if lay["prompt_k"].shape != (u, hkv, plen, d) or lay["prompt_v"].shape != (u, hkv, plen, d):
                raise ValueError("decode_step: prompt keys/values must be (U, Hkv, P, D)")
            if lay["k_cache"].shape != (n, hkv, span, d) or lay["v_cache"].shape != (n, hkv, span, d):
                raise ValueError("decode_step: caches must be (N, Hkv, T, D)")
            shapes = {"qkv": (h, (hq + 2 * hkv) * d), "o": (hq * d, h), "gate_up": (h, 2 * inter), "down": (inter, h)}
            for name, (k, out) in shapes.items():
                if (lay[name].k, lay[name].n) != (k, out):
                    raise ValueError(f"decode_step: {name} must be packed from a ({k}, {out}) matrix")
            tensors = [lay[k] for k in ("ln1", "ln2", "qkv_bias", "prompt_k", "prompt_v", "k_cache", "v_cache")]
            if not all(kernels.runs_on(t) and t.is_contiguous() for t in tensors):
                raise ValueError("decode_step: contiguous float32 CPU tensors")
        if embed.shape != (head.n, h) or head.k != h or not embed.is_contiguous() or prompt_of.shape != (n,):
            raise ValueError("decode_step: embedding (V, H), head packed from (H, V), one prompt index per row")
        if prompt_of.dtype != torch.int64 or not prompt_of.is_contiguous() or not prompt_mask.is_contiguous():
            raise ValueError("decode_step: contiguous int64 prompt indices and a contiguous prompt mask")
        self._keep = (layers, embed, norm, head, prompt_mask, prompt_of)  # alive as long as the step
        self._layers = (DecodeLayer * len(layers))(
            *[DecodeLayer(*[lay[f].buffer.data_ptr() if isinstance(lay[f], PackedMatrix) else lay[f].data_ptr()
                            for f, _ in DecodeLayer._fields_]) for lay in layers]
        )  # fmt: skip
        self.x = torch.empty(n, h, dtype=torch.float32)  # (N, H) the residual stream
        self.logits = torch.empty(n, head.n, dtype=torch.float32)  # (N, V)
        self._scratch = torch.empty(n * (h + (hq + 2 * hkv) * d + hq * d + 3 * inter), dtype=torch.float32)
        self._fn, self._n_layers, self._compute = kernels._decode_step, len(layers), gemm.compute_address
        self._fixed = (
            embed.data_ptr(), prompt_mask.data_ptr(), prompt_of.data_ptr(), u, plen, span, norm.data_ptr(),
            head.buffer.data_ptr(), self.logits.data_ptr(), n, h, inter, head.n, hq, hkv, d, eps, d**-0.5,
        )

    def __call__(self, tokens: Tensor, cos: Tensor, signed_sin: Tensor, slot: int) -> Tensor:
        """Logits (N, V) after feeding tokens (N,) int64 at generated slot `slot` (cos, signed_sin
        (N, D) contiguous at their positions); the caches' slot is written. The returned tensor is
        overwritten by the next call."""
        embed, mask, prompt_of, u, plen, span, norm, head, logits, n, h, inter, vocab, hq, hkv, d, eps, scale = (
            self._fixed
        )
        if tokens.shape != (n,) or tokens.dtype != torch.int64 or not tokens.is_contiguous() or not 0 <= slot < span:
            raise ValueError("decode_step: tokens (N,) int64 contiguous and a slot below T")
        if not (cos.is_contiguous() and signed_sin.is_contiguous() and cos.numel() == signed_sin.numel() == n * d):
            raise ValueError("decode_step: cos and signed_sin must be contiguous (N, D)")
        done = self._fn(
            ctypes.cast(self._layers, ctypes.c_void_p), self._n_layers, tokens.data_ptr(), embed, self.x.data_ptr(),
            cos.data_ptr(), signed_sin.data_ptr(), mask, prompt_of, u, plen, span, slot, norm, head, logits, n, h,
            inter, vocab, hq, hkv, d, eps, scale, self._scratch.data_ptr(), self._compute, torch.get_num_threads(),
        )  # fmt: skip
        if done != 0:
            what = "a prompt index outside 0..U-1" if done == -1 else "a token outside the vocabulary"
            raise ValueError(f"decode_step: {what}")
        return self.logits


def _rows_uniform(t: Tensor) -> bool:
    """True when t (..., W) is rows of W contiguous values, one row stride apart."""
    if t.dim() <= 2:
        return True
    expected = t.stride(-2)
    for size, st in zip(reversed(t.shape[:-1]), reversed(t.stride()[:-1])):
        if size != 1 and st != expected:
            return False
        expected *= size
    return True


def _cache_dir() -> Path:
    root = os.environ.get("GRPO_NATIVE_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "grpo-pipeline" / "native"


CPUINFO = Path("/proc/cpuinfo")
# The /proc/cpuinfo keys that tell what -march=native compiles for: x86's model and flags, ARM's
# implementer, architecture, variant, part and features (aarch64 has no "model name" or "flags").
CPU_KEYS = frozenset(
    {"model name", "flags", "CPU implementer", "CPU architecture", "CPU variant", "CPU part", "Features"}
)
CLOCK_KEYS = frozenset({"cpu MHz", "BogoMIPS", "bogomips", "clock"})  # change from run to run
HASH_SUFFIX = ".sha256"  # the sidecar of a built library: its sha256, as `sha256sum` writes it
_PINNED_FDS: list[int] = []  # descriptors the loaded libraries were loaded through (see `_load`)


def _cpu_signature(cpuinfo: Path = CPUINFO) -> str:
    """The machine and the CPU's kind: -march=native code is only reused on the same kind. The
    cpuinfo lines of CPU_KEYS (x86: model and flags; ARM: implementer, part, features...); on a
    CPU with none of those, every line but the clock speeds."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError as exc:
        log.debug("native kernels: %s unreadable (%s); keying the build by platform.processor()", cpuinfo, exc)
        return f"{platform.machine()}\n{platform.processor()}"
    keyed = [(line.partition(":")[0].strip(), line.strip()) for line in lines if ":" in line]
    wanted = [line for key, line in keyed if key in CPU_KEYS] or [
        line for key, line in keyed if key not in CLOCK_KEYS
    ]
    return "\n".join([platform.machine(), *sorted(set(wanted))])


def _unsafe(st: os.stat_result) -> str | None:
    """Why a file or folder with this status could hold another user's code, else None."""
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group/others (mode {stat.S_IMODE(st.st_mode):#o})"
    return None


def _open_private_dir(path: Path) -> int:
    """A descriptor of the cache folder `path`, created (mode 0700) where missing. RuntimeError,
    saying why, where it is a symlink or not a folder, is another user's, or is writable by group
    or others: whatever it holds could be someone else's code. The check is of the opened folder
    (fstat); the library and its record are then read, written and renamed through the descriptor."""
    if not os.path.lexists(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # made meanwhile by another process: checked below
            os.mkdir(path, 0o700)

    def refuse(problem: str) -> RuntimeError:
        return RuntimeError(
            f"the native cache {path} {problem}; refusing to load code from it (make it yours and 0700, or set "
            "GRPO_NATIVE_CACHE)"
        )

    if path.is_symlink():
        raise refuse("is a symlink")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # replaced by a symlink or a file since
            raise refuse("is a symlink or not a folder") from exc
        raise
    problem = _unsafe(os.fstat(fd))
    if problem is not None:
        os.close(fd)
        raise refuse(problem)
    return fd


class _Unverified(RuntimeError):
    """A cached library that is not to be loaded: why, and whether that looks like tampering."""

    def __init__(self, why: str, *, suspicious: bool) -> None:
        super().__init__(why)
        self.suspicious = suspicious


def _open_own_file(dir_fd: int, name: str) -> int:
    """A read descriptor of `name` in the folder `dir_fd`, not following a symlink, checked to be a
    regular file of this user that group/others cannot write. FileNotFoundError where there is
    none, _Unverified where it fails a check."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _Unverified(f"{name} is a symlink", suspicious=True) from exc
        raise
    st = os.fstat(fd)
    problem = "is not a regular file" if not stat.S_ISREG(st.st_mode) else _unsafe(st)
    if problem is not None:
        os.close(fd)
        raise _Unverified(f"{name} {problem}", suspicious=True)
    return fd


def _open_verified(dir_fd: int, name: str) -> int:
    """A descriptor of the library `name` in the folder `dir_fd` whose bytes, read through that
    descriptor, have the sha256 recorded in `name`.sha256: the descriptor to load it through.
    FileNotFoundError where there is no library; _Unverified where it has no record or another
    hash."""
    fd = _open_own_file(dir_fd, name)
    verified = False
    try:
        digest = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
        try:
            record_fd = _open_own_file(dir_fd, name + HASH_SUFFIX)
        except FileNotFoundError as exc:
            raise _Unverified(f"{name} has no recorded sha256", suspicious=False) from exc
        with os.fdopen(record_fd, "rb") as f:
            record = f.read(4096).split()
        if not record or not hmac.compare_digest(record[0], digest.hexdigest().encode()):
            raise _Unverified(f"{name} does not match its recorded sha256", suspicious=True)
        verified = True
        return fd
    finally:
        if not verified:
            os.close(fd)


def _install(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    """`data` as `name` in the folder `dir_fd`, with exactly `mode`: written into a fresh name
    (never an existing file), flushed to disk, then renamed over `name` in one step."""
    tmp = f".{name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=dir_fd)
    installed = False
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # whatever the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        installed = True
    finally:
        if not installed:
            with contextlib.suppress(FileNotFoundError):  # not created or already gone: nothing to clean
                os.unlink(tmp, dir_fd=dir_fd)


def _record(dir_fd: int, name: str, sha256: str) -> None:
    """The sidecar `name`.sha256 (0600) of the library `name`, in `sha256sum`'s format."""
    _install(dir_fd, name + HASH_SUFFIX, f"{sha256}  {name}\n".encode(), 0o600)


def _compile(cc: str, out_dir: Path, dir_fd: int, name: str) -> None:
    """Compile the kernels in a private (0700) temporary folder inside the cache folder `out_dir`
    (open as `dir_fd`), then install the output's bytes as `name` (0700) and, once it is in
    place, their sha256 as its sidecar. RuntimeError, naming the command, on failure."""
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        tmp_so = Path(tmp) / name
        cmd = [cc, *FLAGS, str(SOURCE), "-o", str(tmp_so), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-500:]}")
        # read back through the checked folder's descriptor: the folder `tmp` names inside it
        # (its mode is the umask's; the 0700 folder keeps it private)
        tmp_fd = os.open(Path(tmp).name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
        try:
            out_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=tmp_fd)
        finally:
            os.close(tmp_fd)
        with os.fdopen(out_fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise RuntimeError(f"`{' '.join(cmd)}` did not write a regular file")
            data = f.read()
    _install(dir_fd, name, data, 0o700)
    _record(dir_fd, name, hashlib.sha256(data).hexdigest())


def _verified_build(compiler: str | None, cache_dir: Path | None) -> tuple[Path, int]:
    """`build`: (the library's path, a descriptor of it through which its bytes were just checked
    against its recorded sha256). A cached library without a matching record is rebuilt; one
    that still does not match after that is a RuntimeError."""
    names = [compiler] if compiler else [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc"]
    cc = next((found for found in map(shutil.which, names) if found), None)
    if cc is None:
        raise RuntimeError(f"no C compiler found ({' or '.join(names)}); install gcc or set CC")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(
        "\n".join([SOURCE.read_text(), cc, version, " ".join(FLAGS), _cpu_signature()]).encode()
    ).hexdigest()[:16]
    out_dir = cache_dir or _cache_dir()
    target = out_dir / f"grpo_native_{key}.so"
    dir_fd = _open_private_dir(out_dir)
    try:
        try:
            return target, _open_verified(dir_fd, target.name)
        except FileNotFoundError:
            log.debug("native kernels: no build at %s yet; compiling", target)
        except _Unverified as exc:
            (log.warning if exc.suspicious else log.info)("native kernels: %s (in %s); rebuilding it", exc, out_dir)
        _compile(cc, out_dir, dir_fd, target.name)
        try:
            return target, _open_verified(dir_fd, target.name)
        except (FileNotFoundError, _Unverified) as exc:
            raise RuntimeError(f"the rebuilt {target} failed its check ({exc}); not loading it") from exc
    finally:
        os.close(dir_fd)


def build(compiler: str | None = None, cache_dir: Path | None = None) -> Path:
    """Compile the kernels (once: an existing build for this source, compiler and CPU is reused
    where its bytes match its recorded sha256, else rebuilt) into the private cache folder and
    return the shared library's path. Raises RuntimeError, naming the command or the reason
    (no compiler, an unsafe cache folder, a build that fails its hash check), on failure."""
    path, fd = _verified_build(compiler, cache_dir)
    os.close(fd)
    return path


def _load(path: Path, fd: int) -> ctypes.CDLL:
    """ctypes.CDLL of the library `path` just checked through the descriptor `fd`. The loader
    opens it as /proc/self/fd/N: the very file whose bytes were hashed, whatever has happened to
    `path` since. The descriptor stays open for the process's life, so that name never means
    another file (the loader reuses a loaded library by its name). Without /proc, `path`, inside
    the checked private folder."""
    proc = f"/proc/self/fd/{fd}"
    if not os.path.exists(proc):
        os.close(fd)
        return ctypes.CDLL(str(path))
    try:
        lib = ctypes.CDLL(proc)
    except OSError:
        os.close(fd)
        raise
    _PINNED_FDS.append(fd)
    return lib


def _self_check(kernels: NativeKernels) -> None:
    """A small attention step against torch's operators; raises RuntimeError on disagreement."""
    g = torch.Generator().manual_seed(0)
    n, hq, hkv, d, plen, span, slot = 3, 4, 2, 8, 3, 6, 4
    qkv, bias = torch.randn(n, (hq + 2 * hkv) * d, generator=g), torch.randn((hq + 2 * hkv) * d, generator=g)
    cos, sin = torch.rand(n, d, generator=g), torch.rand(n, d, generator=g)
    pk, pv = torch.randn(2, hkv, plen, d, generator=g), torch.randn(2, hkv, plen, d, generator=g)
    pmask = torch.zeros(2, plen)
    pmask[1, :2] = float("-inf")
    prompt_of = torch.tensor([1, 0, 1])
    kc, vc = torch.randn(n, hkv, span, d, generator=g), torch.randn(n, hkv, span, d, generator=g)
    want = reference_decode_attention(
        qkv + bias, cos, sin, pk, pv, pmask, prompt_of, kc.clone(), vc.clone(), hq, slot, d**-0.5
    )
    out = kernels.decode_attention(
        qkv, bias, cos, sin, pk, pv, pmask, prompt_of, kc, vc, torch.empty(n, hq * d), slot, d**-0.5
    )
    if not torch.allclose(out, want, rtol=1e-4, atol=1e-5):
        raise RuntimeError("the compiled kernel disagrees with torch on a test step")


def reference_decode_attention(
    qkv: Tensor, cos: Tensor, signed_sin: Tensor, prompt_k: Tensor, prompt_v: Tensor, prompt_mask: Tensor,
    prompt_of: Tensor, k_cache: Tensor, v_cache: Tensor, hq: int, slot: int, scale: float,
) -> Tensor:  # fmt: skip
    """`NativeKernels.decode_attention` in torch operators for qkv with its bias added (writes the
    caches too) -> (N, Hq D)."""
    n, hkv, _, d = k_cache.shape
    heads = qkv.view(n, hq + 2 * hkv, d)  # (N, Hq + 2 Hkv, D)
    qk = heads[:, : hq + hkv]  # (N, Hq + Hkv, D)
    qk = qk * cos[:, None] + torch.roll(qk, d // 2, dims=-1) * signed_sin[:, None]  # (N, Hq + Hkv, D)
    k_cache[:, :, slot] = qk[:, hq:]
    v_cache[:, :, slot] = heads[:, hq + hkv :]
    q = qk[:, :hq].reshape(n, hkv, hq // hkv, d)  # (N, Hkv, rep, D)
    keys = torch.cat([prompt_k[prompt_of], k_cache[:, :, : slot + 1]], dim=2)  # (N, Hkv, P + slot + 1, D)
    values = torch.cat([prompt_v[prompt_of], v_cache[:, :, : slot + 1]], dim=2)  # (N, Hkv, P + slot + 1, D)
    mask = F.pad(prompt_mask[prompt_of], (0, slot + 1))  # (N, P + slot + 1)
    att = q @ keys.transpose(-1, -2) * scale + mask[:, None, None]  # (N, Hkv, rep, L)
    return (att.softmax(-1) @ values).reshape(n, hq * d)  # (N, Hq D)


@dataclass
class PackedMatrix:
    """A (K, N) float32 matrix in MKL's packed GEMM layout (opaque bytes) for products x @ it."""

    buffer: Tensor
    k: int
    n: int


class MklGemm:
    """MKL's packed GEMM through ctypes: `pack` a (K, N) right-hand side once, then `mm` many
    (M, K) left-hand sides by it. Same MKL kernels as torch.mm, so the same results."""

    ROW_MAJOR, NO_TRANS, PACKED, B_MATRIX = 101, 111, 151, 162  # CBLAS enums

    def __init__(self, lib: ctypes.CDLL) -> None:
        i32, f32, ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
        self._size = lib.cblas_sgemm_pack_get_size
        self._size.restype, self._size.argtypes = ctypes.c_size_t, [i32] * 4
        self._pack = lib.cblas_sgemm_pack
        self._pack.restype, self._pack.argtypes = None, [i32] * 6 + [f32, ptr, i32, ptr]
        self._compute = lib.cblas_sgemm_compute
        self._compute.restype, self._compute.argtypes = None, [i32] * 6 + [ptr, i32, ptr, i32, f32, ptr, i32]
        self.compute_address = ctypes.cast(self._compute, ctypes.c_void_p).value  # for native callers

    def pack(self, weights: list[Tensor], rows: int) -> list[PackedMatrix]:
        """Each w (K, N), float32 CPU, packed for products with about `rows` rows (any row count
        runs). MKL asks for several MB per matrix and writes only part of it, so the packs share
        one allocation, which is mapped apart from the heap (untouched pages cost no memory) and
        returned whole when the last pack goes."""
        for w in weights:
            if w.dim() != 2 or w.dtype != torch.float32 or w.device.type != "cpu":
                raise ValueError("pack: 2-D float32 CPU matrices")
        sizes = [(self._size(self.B_MATRIX, rows, w.shape[1], w.shape[0]) + 63) // 64 * 16 for w in weights]  # floats
        buffer = torch.empty(sum(sizes) + 16, dtype=torch.float32)
        start = (-buffer.data_ptr() // 4) % 16  # 64-byte aligned
        packs = []
        for w, size in zip(weights, sizes):
            w = w.contiguous()
            k, n = w.shape
            dest = buffer[start : start + size]
            self._pack(self.ROW_MAJOR, self.B_MATRIX, self.NO_TRANS, rows, n, k, 1.0, w.data_ptr(), n, dest.data_ptr())
            packs.append(PackedMatrix(dest, k, n))
            start += size
        return packs

    def mm(self, x: Tensor, b: PackedMatrix, out: Tensor | None = None) -> Tensor:
        """x (M, K) @ b -> a new (M, N) tensor, or added into `out` (M, N) in place."""
        m = x.shape[0]
        if x.shape != (m, b.k) or not x.is_contiguous() or x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(f"mm: x must be a contiguous float32 CPU ({m}, {b.k})")
        if out is not None and (out.shape != (m, b.n) or not out.is_contiguous() or out.dtype != torch.float32):
            raise ValueError(f"mm: out must be a contiguous float32 ({m}, {b.n})")
        beta = 0.0 if out is None else 1.0
        out = torch.empty(m, b.n, dtype=torch.float32) if out is None else out
        self._compute(
            self.ROW_MAJOR, self.NO_TRANS, self.PACKED, m, b.n, b.k, x.data_ptr(), b.k, b.buffer.data_ptr(), b.n, beta,
            out.data_ptr(), b.n,
        )  # fmt: skip
        return out


@functools.cache
def mkl_gemm() -> MklGemm | None:
    """MKL's packed GEMM from torch's CPU library, checked against torch.mm; None where torch has
    no MKL (or `GRPO_NATIVE=0`)."""
    if os.environ.get("GRPO_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        gemm = MklGemm(lib)
        g = torch.Generator().manual_seed(0)
        x, w, acc = torch.randn(5, 7, generator=g), torch.randn(7, 9, generator=g), torch.randn(5, 9, generator=g)
        (packed,) = gemm.pack([w], 5)
        ok = torch.allclose(gemm.mm(x, packed), x @ w, rtol=1e-5, atol=1e-5) and torch.allclose(
            gemm.mm(x, packed, acc.clone()), acc + x @ w, rtol=1e-5, atol=1e-5
        )
    except (OSError, AttributeError, RuntimeError) as exc:
        log.info("MKL packed GEMM unavailable, using torch.mm: %s", exc)
        return None
    return gemm if ok else None


@functools.cache
def kernels() -> NativeKernels | None:
    """The compiled kernels, or None (the reason logged once) where they cannot run here."""
    if os.environ.get("GRPO_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if platform.system() != "Linux":
        log.info("native kernels: off (built on Linux only)")
        return None
    try:
        loaded = NativeKernels(_load(*_verified_build(None, None)))
        _self_check(loaded)
    except (OSError, RuntimeError, AttributeError) as exc:
        log.warning("native kernels unavailable, using torch operators instead: %s", exc)
        return None
    return loaded
