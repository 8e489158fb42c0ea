"""A fast path for Qwen2-architecture policies: lean sampling and per-token log-probs.

    from grpo.engines.cpu_fast.qwen2 import FastQwen2, completion_logprobs_fast, supports
    if supports(model):                                   # else: the plain Hugging Face path
        fast = FastQwen2(model)
        ids, lengths, finished = fast.generate(u_ids, u_mask, 8, ...)   # `CpuFastEngine` wraps this
        args = (prompt_ids, prompt_mask, completion_ids, completion_mask)
        with torch.no_grad():                                      # reference = adapter off
            ref = completion_logprobs_fast(fast, *args, use_adapter=False)
        logp = completion_logprobs_fast(fast, *args)               # LoRA unmerged, in autograd
        ...; optimizer.step(); fast.sync(model)                    # re-merge for the next rollout

`FastQwen2` holds references to the frozen base weights of a `Qwen2ForCausalLM` (optionally wrapped
in a peft LoRA `PeftModel`) and runs the decoder as a few functional torch calls:

- sampling: a separate set of generation weights, W^T + scaling A^T B^T merged at each `sync` (the
  base tensors are never written) and stored transposed, q/k/v and gate/up side by side, so that
  each is one plain GEMM (the quickest form for a few dozen rows on CPU); each unique prompt
  is prefilled once, then one token per iteration is decoded for all N rows into a preallocated
  KV cache per layer (with the native kernels, (N, kv_heads, T, head_dim) beside the prompts'
  own (U, kv_heads, P, head_dim), which all G rows of a prompt read; else (N, kv_heads, P + T,
  head_dim), the prompt copied in), with rotary tables precomputed for every step and an
  additive padding mask built once. The token choice is the `hf` engine's
  (temperature, `grpo.engines.base.filter_logits`, softmax, multinomial), so a given torch.Generator
  draws the same tokens as the plain path; `sampler="inverse_cdf"` draws the same distribution
  from one uniform per row (much cheaper on CPU, different random stream).
- log-probs: one forward over prompt + completion with the LoRA applied unmerged
  (y = x W^T + b + (dropout(x) A^T B^T) * scaling, with peft's own lora_A / lora_B parameters, so
  gradients land on them). The projections that read one input (q/k/v, gate/up) run as one
  autograd Function (`_LoraProjections`) whose backward accumulates a single input gradient in
  place; RMSNorm and the rotary embedding have hand-written backward passes with fewer passes
  over memory, and attention keeps its softmax for the backward (native kernels; else torch's
  fused kernel). The hidden states are sliced to the T predicting positions before the final
  norm and lm_head, and the log-softmax is gathered chunk by chunk through a logsumexp (no
  (N, T, V) autograd graph). With `share_prompts=True` (the default) each distinct prompt of a
  block runs through the layers once and its rows attend to its keys/values: the same function
  of the weights (autograd sums the gradient over the group). One difference under LoRA
  dropout: the G rows of a prompt then share that prompt's dropout mask (peft draws one per row).
- on CPU, the forward products with the frozen base weights go through torch's oneDNN linear
  op (`torch.ops.mkldnn`, the op inductor emits) when it is available, the weights packed once
  into its blocked layout (as inductor does for frozen weights); the adapter's thin products and
  the backward's in-place accumulation through torch's own GEMM, which measured as quick or
  quicker for them.
- on CPU in float32, the decode step's rotary embedding + cache write + attention, SwiGLU,
  RMSNorm and the rotary embedding (forward and backward), the log-prob passes' attention, the
  LoRA dropout (as corrections of one shared x A^T product) and the inverse-CDF token draw run
  as the native kernels of `grpo.engines.cpu_fast.native` when they build here (one pass each instead of a chain
  of small operators); otherwise as torch operators. The decode step's products with the
  generation weights go through MKL's packed GEMM (`grpo.engines.cpu_fast.native.mkl_gemm`) where torch has MKL.

`supports(model)` names what is covered; any other model (other architecture, other adapter types,
rope scaling, sliding windows, merged adapters) returns False and callers use the Hugging Face path.
Tests: `pytest -q tests/test_fastpath.py`. Departures from the paper: none (same math as
`grpo.algorithm.completion_logprobs` and the `hf` engine; float rounding aside).

Legend: B prompts, G samples per prompt, N = B*G rows, U unique prompts, P prompt tokens,
T completion tokens, V vocabulary, H hidden size, D head dim, L sequence length, M = rows x tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grpo.algorithm import in_row_blocks
from grpo.engines.base import SAMPLERS, pick_tokens
from grpo.engines.cpu_fast.native import DecodeStep, MklGemm, NativeKernels, PackedMatrix, kernels, mkl_gemm

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------- CPU runtime


def dropout_keep(shape: tuple[int, ...], p: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A dropout keep mask: independent Bernoulli(1 - p) entries, 1.0 kept / 0.0 dropped.

    On CPU, for p up to 0.25, the zeros are at `dropped_positions` (about p times as many random
    numbers as entries, 4x faster at p = 0.05); elsewhere `rand >= p`. The draws come from the
    global torch RNG, so `torch.manual_seed` fixes the mask.
    """
    if device.type != "cpu" or p > 0.25:
        return torch.rand(shape, device=device, dtype=torch.float32).ge_(p).to(dtype)
    keep = torch.ones(math.prod(shape), dtype=dtype, device=device)  # (n,)
    keep.index_fill_(0, dropped_positions(keep.shape[0], p, device), 0)
    return keep.view(shape)


def dropped_positions(n: int, p: float, device: torch.device) -> Tensor:
    """Ascending flat positions (k,) of the dropped entries of n independent Bernoulli(p) draws.

    It draws the gaps between dropped positions instead of one uniform per entry:
    gap = ceil(log(1 - u) / log(1 - p)) for u uniform in [0, 1) is Geometric(p), so the positions
    are those of an i.i.d. Bernoulli(p) sequence, from about n p uniforms: on CPU with the native
    kernels, `NativeKernels.dropped_positions` from one seed drawn from the global torch RNG
    (4x quicker at p = 0.05); otherwise `torch_dropped_positions`. Either way
    `torch.manual_seed` fixes the positions.
    """
    native = kernels() if device.type == "cpu" else None
    if native is None:
        return torch_dropped_positions(n, p, device)
    seed = int(torch.randint(-(2**63), 2**63 - 1, ()))
    return native.dropped_positions(n, p, seed)


def torch_dropped_positions(n: int, p: float, device: torch.device, *, gaps_per_draw: int = 0) -> Tensor:
    """`dropped_positions` in torch operators: the uniforms are float64 draws of the global torch
    RNG, `gaps_per_draw` at a time (0: enough for all n but for ~1e-9 of draws)."""
    log_q = math.log1p(-p)
    found: list[Tensor] = []
    start = 0
    while start < n:
        mean = (n - start) * p
        k = gaps_per_draw or int(mean + 6 * math.sqrt(mean) + 16)
        u = torch.rand(k, dtype=torch.float64, device=device)  # (k,)
        gaps = torch.log1p(u.neg_()).div_(log_q).ceil_().clamp_(min=1)  # (k,) Geometric(p), >= 1
        drops = gaps.cumsum_(0).add_(start - 1).long()  # (k,) ascending flat positions of drops
        inside = int(torch.searchsorted(drops, n))  # drops[:inside] < n
        found.append(drops[:inside])
        start = int(drops[-1]) + 1
    return found[0] if len(found) == 1 else torch.cat(found)


# --------------------------------------------------------------------------- linear layers


def onednn_linear_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True when torch's oneDNN linear op (`torch.ops.mkldnn._linear_pointwise`, the one
    inductor emits on CPU) runs here. With weights packed for it (`onednn_packing_available`) it
    runs the log-prob passes' base products; results differ only in float rounding."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x = torch.ones(2, 3, dtype=dtype)
        w = torch.ones(4, 3, dtype=dtype)
        y = op(x, w, torch.ones(4, dtype=dtype), "none", [], "")
        z = op.binary(x, y, w, None, "add")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool((y == 4).all() and (z == 7).all())


PACK_ROWS = 256  # the row count a packed weight's layout is chosen for; any row count runs on it


def onednn_packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True when weights can be reordered once into oneDNN's blocked layout
    (`torch.ops.mkldnn._reorder_linear_weight`, as inductor does for frozen weights): the linear
    op then skips that reorder on every call. 10-35% faster here, the same results."""
    if not onednn_linear_available(device, dtype):
        return False
    try:
        x, w = torch.ones(3, 4, dtype=dtype), torch.ones(5, 4, dtype=dtype)
        y = _dnn(x, _packed(w), None, torch.ones(3, 5, dtype=dtype))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool((y == 5).all())


def _packed(w: Tensor) -> Tensor:
    """w (out, in) in oneDNN's blocked layout: an opaque tensor that only `_dnn` reads."""
    return torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)


def _dnn(x: Tensor, w: Tensor, b: Tensor | None, add: Tensor | None) -> Tensor:
    """x W^T + b (+ add) through oneDNN (no autograd)."""
    if add is None:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    if b is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, add, w, b, "add")
    return torch.ops.mkldnn._linear_pointwise.binary(x, add, w, None, "add")


def _rms_norm(x: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x r w, r) with r = 1 / sqrt(mean(x^2) + eps) (..., 1) for float32 CPU tensors: one pass
    with the native kernel (`grpo.engines.cpu_fast.native`), else three full-size passes over x, where torch's
    composite CPU rms_norm takes about six."""
    native = kernels()
    if native is not None and native.runs_on(x, w):
        out, r = native.rms_norm(x, w, eps, with_rstd=True)
        return out, r  # type: ignore[return-value]
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # (..., 1)
    r = torch.addcmul(torch.tensor(eps, dtype=x.dtype), norm, norm, value=1 / x.shape[-1]).rsqrt_()  # (..., 1)
    return torch.mul(x, r).mul_(w), r  # (..., H), (..., 1)


class _RMSNorm(torch.autograd.Function):
    """`_rms_norm` for a frozen w, with a hand-written backward:
    dx = r (g w - x r^2 mean(g w x)), r = 1 / sqrt(mean(x^2) + eps). Four full-size passes
    where autograd through torch's composite CPU rms_norm takes about twice as many."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, eps: float) -> Tensor:
        out, r = _rms_norm(x, w, eps)
        ctx.save_for_backward(x, w, r)
        return out  # (..., H)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, w, r = ctx.saved_tensors
        native = kernels()
        if native is not None:
            return native.rms_norm_backward(g, x, w, r), None, None  # (..., H)
        gw = g * w  # (..., H)
        coef = torch.linalg.vecdot(gw, x, dim=-1)[..., None].mul_(r.square()).div_(-x.shape[-1])  # (..., 1)
        return torch.addcmul(gw, x, coef).mul_(r), None, None  # (..., H)


def _swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up: the native kernels' single pass for float32 CPU tensors (`_SwiGLU` when
    autograd needs it), else torch's operators."""
    native = kernels()
    if native is None or not native.runs_on(gate, up):
        return F.silu(gate) * up
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLU.apply(gate, up)
    return native.swiglu(gate, up)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up with the native one-pass forward and backward (float32 CPU)."""

    @staticmethod
    def forward(ctx: Any, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return kernels().swiglu(gate, up)  # type: ignore[union-attr]

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor]:
        gate, up = ctx.saved_tensors
        return kernels().swiglu_backward(g, gate, up)  # type: ignore[union-attr]


def _rotary(x: Tensor, cos: Tensor, signed_sin: Tensor, *, transpose: bool = False) -> Tensor:
    """x * cos + rotate_half(x) * sin (rotate_half's sign folded into `signed_sin`) as one multiply
    and two half-width multiply-adds: five passes over x where mul, roll and addcmul take seven.
    `transpose` applies the transposed rotation (the backward): the halves of sin swap. The
    native kernel does it in one pass for float32 CPU heads x (n, H, L, D), cos (n, 1, L, D)."""
    native = kernels()
    if (
        native is not None
        and x.dim() == 4
        and native.runs_on(x, cos, signed_sin)
        and cos.shape == (x.shape[0], 1, *x.shape[2:])
        and cos.is_contiguous()
        and signed_sin.is_contiguous()
    ):
        return native.rotary(x, cos, signed_sin, transpose=transpose)  # (n, H, L, D)
    h = x.shape[-1] // 2
    out = x * cos  # (..., D)
    first, second = signed_sin[..., :h], signed_sin[..., h:]  # (..., D/2) each
    if transpose:
        first, second = second, first
    out[..., :h].addcmul_(x[..., h:], first)
    out[..., h:].addcmul_(x[..., :h], second)
    return out


class _Rotary(torch.autograd.Function):
    """`_rotary` in autograd: the gradient is the transposed rotation of the output gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, signed_sin)
        return _rotary(x, cos, signed_sin)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        cos, signed_sin = ctx.saved_tensors
        return _rotary(g, cos, signed_sin, transpose=True), None, None


class _Attention(torch.autograd.Function):
    """Attention through the native kernels: the forward keeps the softmax (n, Hkv, Hq / Hkv L, Lk)
    for the backward, which then needs no second pass over q k^T. Optional prompt keys/values
    (U, Hkv, P, D) with each row's prompt `rows` (n,) come first in each row's keys; their
    gradient sums the rows of each prompt. Optional rotary tables (cos, signed_sin (n, L, D)):
    q and k come unrotated and the kernels rotate them (and their gradients back)."""

    @staticmethod
    def applies(
        native: NativeKernels, q: Tensor, k: Tensor, v: Tensor, mask: Tensor,
        prefix: tuple[Tensor, Tensor, Tensor] | None,
    ) -> bool:  # fmt: skip
        tensors = (q, k, v, mask, *(prefix or ())[:2])
        return q.shape[-1] % 16 == 0 and native.runs_on(*tensors) and mask.is_contiguous()

    @staticmethod
    def forward(
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, pk: Tensor | None, pv: Tensor | None,
        rows: Tensor | None, cos: Tensor | None, signed_sin: Tensor | None,
    ) -> Tensor:  # fmt: skip
        native = kernels()
        prefix = (pk, pv, rows) if pk is not None else None
        rope = (cos, signed_sin) if cos is not None else None
        out, probs = native.attention(q, k, v, mask, keep_probs=True, prefix=prefix, rope=rope)  # (n, Hq, L, D)
        ctx.native, ctx.has_prefix, ctx.has_rope = native, prefix is not None, rope is not None
        ctx.save_for_backward(q, k, v, probs, *(prefix or ()), *(rope or ()))  # probs (n, Hkv, rep L, Lk)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, probs, *rest = ctx.saved_tensors
        prefix = tuple(rest[:3]) if ctx.has_prefix else None
        rope = tuple(rest[-2:]) if ctx.has_rope else None
        g = g if g.stride(-1) == 1 else g.contiguous()  # (n, Hq, L, D)
        dq, dk, dv, dpk, dpv = ctx.native.attention_backward(g, probs, q, k, v, prefix, rope)
        if prefix is not None:
            pk, pv, rows = prefix  # the rows of each prompt summed: (U, Hkv, P, D) each
            dpk = torch.zeros_like(pk, memory_format=torch.contiguous_format).index_add_(0, rows, dpk)
            dpv = torch.zeros_like(pv, memory_format=torch.contiguous_format).index_add_(0, rows, dpv)
        return dq, dk, dv, None, dpk, dpv, None, None, None


@dataclass
class _Projection:
    """One projection of `_LoraProjections`: its frozen base weight and, when the adapter runs,
    its LoRA scaling and dropout (the flat positions of the dropped entries of x, or a keep mask)."""

    w: Tensor  # (out, in) base weight: x W^T, and g W for the input gradient
    w_fwd: Tensor  # the same weight in the forward GEMM's layout (oneDNN-packed, or w itself)
    bias: Tensor | None  # (out,)
    lora: bool  # an A, B pair follows in `_LoraProjections.apply`'s arguments
    scale: float = 1.0  # LoRA scaling, 1 / (1 - p) of dropout included
    drops: Tensor | None = None  # (k,) flat positions of x's dropped entries (CPU)
    keep: Tensor | None = None  # (..., in) 0/1 keep mask (elsewhere)

    def base(self, x2: Tensor, residual: Tensor | None) -> Tensor:
        """x2 W^T + b (+ residual): x2 (M, in) -> (M, out), a new tensor."""
        add = residual.reshape(-1, self.w.shape[0]) if residual is not None else None  # (M, out)
        if self.w_fwd is not self.w:  # oneDNN-packed
            return _dnn(x2, self.w_fwd, self.bias, add)
        if add is not None:
            return torch.addmm(add if self.bias is None else add + self.bias, x2, self.w.t())
        return F.linear(x2, self.w, self.bias)

    def dropped(self, x: Tensor) -> Tensor:
        """dropout(x) without the 1 / (1 - p): x itself, or a copy with the drops zeroed."""
        if self.drops is not None:
            xd = torch.clone(x, memory_format=torch.contiguous_format)  # (M, in)
            xd.view(-1).index_fill_(0, self.drops, 0)
            return xd
        return x if self.keep is None else x * self.keep.view(x.shape)


class _LoraProjections(torch.autograd.Function):
    """y_i = x W_i^T + b_i (+ residual) + scale_i (dropout_i(x) A_i^T) B_i^T for the projections
    that read one input x (q/k/v, gate/up, or a single one), peft's LoRA applied unmerged.

    Forward, per projection: the base GEMM, then xa = dropout(x) A^T and y += scale xa B^T in
    place (the GEMM adds into y: no separate pass over it). Backward: the A and B gradients and
    ONE input gradient for all the projections, accumulated in place (the dropout-masked
    (g B) A, then + g W by the GEMM itself), where autograd would materialise and sum two
    tensors per projection. The dropout draws are the caller's (`_Projection`).

    With the native kernels (float32 CPU, sparse dropout or none), `forward_corrected` and
    `backward_corrected` run instead: one x A^T product for the whole group and one product each
    for the A gradients and the adapters' input gradient, corrected at the dropped entries only,
    where the form above copies x once per projection and multiplies each copy separately.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, residual: Tensor | None, projs: list[_Projection], *ab: Tensor
    ) -> tuple[Tensor, ...]:
        native = kernels()
        if native is not None and _LoraProjections.corrects_dropout(native, x, projs, ab):
            return _LoraProjections.forward_corrected(ctx, native, x, residual, projs, ab)
        ctx.native = None
        x2 = x.reshape(-1, x.shape[-1])  # (M, in)
        outs, saved, pairs = [], [], iter(zip(ab[0::2], ab[1::2]))
        for pr in projs:
            out_dim = pr.w.shape[0]
            y = pr.base(x2, residual)  # (M, out)
            if pr.lora:
                a, b = next(pairs)  # (r, in), (out, r)
                xd = pr.dropped(x2.to(a.dtype))  # (M, in)
                xa = torch.mm(xd, a.t())  # (M, r)
                if y.dtype == a.dtype:
                    y.addmm_(xa, b.t(), alpha=pr.scale)  # (M, out)
                else:  # e.g. a float32 adapter on a bfloat16 base: added as peft does, then cast
                    y = torch.addmm(y.to(a.dtype), xa, b.t(), alpha=pr.scale).to(y.dtype)  # (M, out)
                saved += [xd, xa]
            outs.append(y.view(*x.shape[:-1], out_dim))
        ctx.projs, ctx.x_shape, ctx.x_dtype = projs, x.shape, x.dtype
        ctx.save_for_backward(*saved, *ab)
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        if ctx.native is not None:
            return _LoraProjections.backward_corrected(ctx, *grads)
        projs: list[_Projection] = ctx.projs
        tensors = ctx.saved_tensors
        n_saved = 2 * sum(pr.lora for pr in projs)
        saved, ab = iter(zip(tensors[:n_saved:2], tensors[1:n_saved:2])), tensors[n_saved:]
        pairs = iter(zip(ab[0::2], ab[1::2]))
        want_x = ctx.needs_input_grad[0]
        gx: Tensor | None = None  # (M, in)
        grad_ab: list[Tensor | None] = []
        for pr, g in zip(projs, grads):
            if g is None:
                if pr.lora:
                    next(saved), next(pairs)
                    grad_ab += [None, None]
                continue
            g = g.reshape(-1, pr.w.shape[0])  # (M, out)
            if pr.lora:
                (xd, xa), (a, b) = next(saved), next(pairs)
                gl = g.to(a.dtype)  # (M, out)
                gxa = torch.mm(gl, b).mul_(pr.scale)  # (M, r)
                grad_ab += [torch.mm(gxa.t(), xd), torch.mm(xa.t(), gl).t().mul_(pr.scale)]  # (r, in), (out, r)
                if want_x:
                    t = torch.mm(gxa, a)  # (M, in): the LoRA branch's input gradient
                    if pr.drops is not None:
                        t.view(-1).index_fill_(0, pr.drops, 0)
                    elif pr.keep is not None:
                        t.mul_(pr.keep.view(t.shape))
                    t = t.to(ctx.x_dtype)
                    gx = t if gx is None else gx.add_(t)
            if want_x:
                gx = torch.mm(g, pr.w) if gx is None else gx.addmm_(g, pr.w)  # (M, in)
        grad_x = gx.view(ctx.x_shape) if gx is not None else None
        grad_res = grads[0] if ctx.needs_input_grad[1] else None
        return (grad_x, grad_res, None, *grad_ab)

    # -- the native form: one x A^T product for the group, dropout as corrections (float32 CPU) --

    @staticmethod
    def corrects_dropout(native: NativeKernels, x: Tensor, projs: list[_Projection], ab: tuple[Tensor, ...]) -> bool:
        """True when the native form applies: float32 CPU x and adapters of rank <= 64, sparse
        dropout or none."""
        return (
            bool(ab)
            and native.runs_on(x, *ab)
            and all(pr.keep is None for pr in projs)
            and all(a.shape[0] <= native.MAX_LORA_RANK for a in ab[0::2])
        )

    @staticmethod
    def forward_corrected(
        ctx: Any, native: NativeKernels, x: Tensor, residual: Tensor | None, projs: list[_Projection],
        ab: tuple[Tensor, ...],
    ) -> tuple[Tensor, ...]:  # fmt: skip
        """x A^T for all the group's adapters in one GEMM (x read once, no dropped copies of x),
        then each projection's dropped entries subtracted (`NativeKernels.lora_drop_xa`)."""
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (M, in)
        a_all = torch.cat(ab[0::2]) if len(ab) > 2 else ab[0]  # (sum R, in)
        xa_all = torch.mm(x2, a_all.t())  # (M, sum R)
        outs, col, pairs = [], 0, iter(zip(ab[0::2], ab[1::2]))
        for pr in projs:
            out_dim = pr.w.shape[0]
            y = pr.base(x2, residual)  # (M, out)
            if pr.lora:
                a, b = next(pairs)  # (r, in), (out, r)
                xa = xa_all[:, col : col + a.shape[0]]  # (M, r)
                col += a.shape[0]
                if pr.drops is not None:
                    native.lora_drop_xa(x2, pr.drops, a.t().contiguous(), xa)
                y.addmm_(xa, b.t(), alpha=pr.scale)  # (M, out)
            outs.append(y.view(*x.shape[:-1], out_dim))
        ctx.native, ctx.projs, ctx.x_shape = native, projs, x.shape
        ctx.save_for_backward(x2, xa_all, a_all, *ab)
        return tuple(outs)

    @staticmethod
    def backward_corrected(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        """The gradients of `forward_corrected`: A's from one (sum R, M) x (M, in) GEMM and the input
        gradient's adapter terms from one (M, sum R) x (sum R, in) GEMM, each corrected at the
        dropped entries (`lora_drop_backward`)."""
        native: NativeKernels = ctx.native
        projs: list[_Projection] = ctx.projs
        x2, xa_all, a_all, *ab = ctx.saved_tensors
        want_x = ctx.needs_input_grad[0]
        gx: Tensor | None = None  # (M, in)
        gxa_parts: list[Tensor] = []  # (M, r) each
        grad_b: list[Tensor] = []
        col, pairs = 0, iter(zip(ab[0::2], ab[1::2]))
        for pr, g in zip(projs, grads):
            out_dim = pr.w.shape[0]
            g = torch.zeros(x2.shape[0], out_dim, dtype=x2.dtype) if g is None else g.reshape(-1, out_dim)  # (M, out)
            if pr.lora:
                a, b = next(pairs)  # (r, in), (out, r)
                xa = xa_all[:, col : col + a.shape[0]]  # (M, r)
                col += a.shape[0]
                gxa_parts.append(torch.mm(g, b).mul_(pr.scale))  # (M, r)
                grad_b.append(torch.mm(xa.t(), g).t().mul_(pr.scale))  # (out, r)
            if want_x:
                gx = torch.mm(g, pr.w) if gx is None else gx.addmm_(g, pr.w)  # (M, in)
        gxa_all = torch.cat(gxa_parts, dim=1) if len(gxa_parts) > 1 else gxa_parts[0]  # (M, sum R)
        grad_a_all = torch.mm(gxa_all.t(), x2)  # (sum R, in)
        if want_x:
            gx.addmm_(gxa_all, a_all)  # type: ignore[union-attr]
        grad_ab: list[Tensor | None] = []
        col, lora_projs = 0, [pr for pr in projs if pr.lora]
        for pr, gxa, gb, a in zip(lora_projs, gxa_parts, grad_b, ab[0::2]):
            ga = grad_a_all[col : col + a.shape[0]]  # (r, in)
            col += a.shape[0]
            if pr.drops is not None:
                ga.sub_(native.lora_drop_backward(x2, pr.drops, gxa, a.t().contiguous(), gx if want_x else None).t())
            grad_ab += [ga, gb]
        grad_x = gx.view(ctx.x_shape) if gx is not None else None
        grad_res = grads[0] if ctx.needs_input_grad[1] else None
        return (grad_x, grad_res, None, *grad_ab)


# --------------------------------------------------------------------------- support check


def _split_peft(model: Any) -> tuple[Any, Any]:
    """(the Qwen2ForCausalLM inside, the PeftModel around it or None)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return model, None
    if isinstance(model, PeftModel):
        return model.get_base_model(), model
    return model, None


def rope_parameters(cfg: Any) -> dict[str, Any]:
    """The config's rope parameters as one dict in the transformers 5 layout (`rope_type`,
    `rope_theta`, scaling keys): v5 configs carry `rope_parameters`; v4 configs carry
    `rope_theta` and `rope_scaling` (None for the default rope; "type" is the older spelling
    of "rope_type"). `rope_theta` is left out when the config has none."""
    if hasattr(cfg, "rope_parameters"):
        return dict(getattr(cfg, "rope_parameters", None) or {})
    scaling = dict(getattr(cfg, "rope_scaling", None) or {})
    legacy_type = scaling.pop("type", "default")
    rope = {**scaling, "rope_type": scaling.get("rope_type", legacy_type)}
    theta = getattr(cfg, "rope_theta", None)
    if theta is not None:
        rope["rope_theta"] = theta
    return rope


def unsupported_reason(model: Any) -> str | None:
    """Why `model` cannot take the fast path (one line), or None when it can."""
    from transformers import Qwen2ForCausalLM
    from transformers.models.qwen2.modeling_qwen2 import (
        Qwen2Attention,
        Qwen2DecoderLayer,
        Qwen2MLP,
        Qwen2Model,
        Qwen2RMSNorm,
        Qwen2RotaryEmbedding,
    )

    base, peft_model = _split_peft(model)
    if type(base) is not Qwen2ForCausalLM:
        return f"{type(base).__name__} is not a Qwen2ForCausalLM"
    cfg = base.config
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"hidden_act {cfg.hidden_act!r} is not silu"
    rope = rope_parameters(cfg)
    if rope.get("rope_type", "default") != "default" or "rope_theta" not in rope:
        return f"rope parameters {rope!r} are not the default rope"
    if float(getattr(cfg, "attention_dropout", 0.0) or 0.0) != 0.0:
        return "attention_dropout > 0"
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []):
        return "sliding-window attention layers"
    if float(base.model.rotary_emb.attention_scaling) != 1.0:
        return "rotary attention scaling != 1"

    adapter = None
    lora_linear: type | None = None
    if peft_model is not None:
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as LoraLinear

        lora_linear = LoraLinear
        actives = list(getattr(peft_model, "active_adapters", None) or [])
        if len(actives) != 1:
            return f"{len(actives)} active adapters (the fast path takes exactly one)"
        adapter = actives[0]
        pc = peft_model.peft_config[adapter]
        if not isinstance(pc, LoraConfig):
            return f"adapter type {type(pc).__name__} is not LoRA"
        if getattr(pc, "modules_to_save", None) or getattr(pc, "trainable_token_indices", None):
            return "adapter has modules_to_save / trainable tokens"
        if getattr(pc, "use_dora", False) or getattr(pc, "lora_bias", False) or pc.fan_in_fan_out:
            return "adapter uses DoRA, lora_bias or fan_in_fan_out"

    allowed: tuple[type, ...] = (
        Qwen2ForCausalLM, Qwen2Model, Qwen2DecoderLayer, Qwen2Attention, Qwen2MLP, Qwen2RMSNorm,
        Qwen2RotaryEmbedding, nn.ModuleList, nn.ModuleDict, nn.ParameterDict, nn.Embedding,
        nn.Linear, nn.Dropout, nn.Identity,
    )
    for name, mod in base.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if lora_linear is not None and type(mod) is lora_linear:
            if leaf not in PROJECTIONS:
                return f"LoRA on {name} (only the 7 projections are covered)"
            if mod.merged:
                return f"{name}: adapter is merged into the base weights"
            if adapter not in mod.lora_A or getattr(mod, "lora_variant", {}).get(adapter) is not None:
                return f"{name}: adapter {adapter!r} missing or not plain LoRA"
            if mod.lora_bias.get(adapter, False) or mod.fan_in_fan_out:
                return f"{name}: lora_bias / fan_in_fan_out"
            if type(mod.base_layer) is not nn.Linear:
                return f"{name}: base layer {type(mod.base_layer).__name__} is not nn.Linear"
            continue
        if leaf == "act_fn":
            continue  # silu, checked through the config
        if type(mod) in allowed:
            continue
        return f"module {name or '<root>'} of type {type(mod).__name__} is not covered"
    return None


def supports(model: Any) -> bool:
    """True when `model` is a plain Qwen2ForCausalLM, optionally with one plain LoRA adapter on
    (a subset of) q/k/v/o/gate/up/down; False sends callers to the Hugging Face path."""
    return unsupported_reason(model) is None


# --------------------------------------------------------------------------- weights


@dataclass
class _Layer:
    """References to one decoder layer's base tensors and its LoRA modules (never copies)."""

    ln1: Tensor  # (H,)
    ln2: Tensor  # (H,)
    w: dict[str, Tensor]  # projection -> (out, in) base weight
    b: dict[str, Tensor]  # q/k/v -> (out,) bias
    lora: dict[str, Any]  # projection -> peft lora.Linear module (only adapted ones)
    wp: dict[str, Tensor]  # projection -> W packed for oneDNN forward passes (else empty)


@dataclass
class _GenLayer:
    """Generation weights of one layer: LoRA merged, q/k/v and gate/up concatenated, each stored
    transposed and contiguous (new tensors), so x @ W^T is one plain GEMM. For the few dozen rows
    of a decode step that is the quickest form on CPU (MKL), and it is cuBLAS's native one."""

    ln1: Tensor  # (H,)
    ln2: Tensor  # (H,)
    qkv_t: Tensor  # (H, (Hq + 2 Hkv) D)
    qkv_b: Tensor  # ((Hq + 2 Hkv) D,)
    o_t: Tensor  # (Hq D, H)
    gate_up_t: Tensor  # (H, 2 I)
    down_t: Tensor  # (I, H)


def _mm(x: Tensor, w_t: Tensor, bias: Tensor | None = None, add: Tensor | None = None) -> Tensor:
    """x @ W^T (+ bias or + add) for W^T (in, out) contiguous: one GEMM over the flattened rows
    of x (..., in) -> (..., out). No autograd beyond torch's own (generation weights are frozen)."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, in)
    if add is not None:
        out = torch.addmm(add.reshape(-1, w_t.shape[1]), x2, w_t)  # (M, out)
    elif bias is not None:
        out = torch.addmm(bias, x2, w_t)  # (M, out)
    else:
        out = torch.mm(x2, w_t)  # (M, out)
    return out.view(*x.shape[:-1], w_t.shape[1])


class FastQwen2:
    """Functional Qwen2 decoder over a loaded (peft-wrapped) Qwen2ForCausalLM's own tensors."""

    def __init__(self, model: Any) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"FastQwen2 does not cover this model: {reason}; use the Hugging Face path")
        self.sync(model)

    # -- weights -------------------------------------------------------------------------------

    def _collect(self, model: Any) -> None:
        base, peft_model = _split_peft(model)
        cfg = base.config
        self.model = model
        self.adapter = peft_model.active_adapters[0] if peft_model is not None else None
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.hidden_size = int(cfg.hidden_size)
        self.eps = float(cfg.rms_norm_eps)
        self.rope_theta = float(rope_parameters(cfg)["rope_theta"])
        inner = base.model
        self.inv_freq = inner.rotary_emb.inv_freq  # (D/2,) float32
        self.embed = inner.embed_tokens.weight  # (V, H)
        self.norm = inner.norm.weight  # (H,)
        self.lm_head = base.lm_head.weight  # (V, H): the embedding itself when tied
        self.layers: list[_Layer] = []
        for layer in inner.layers:
            mods = {
                "q_proj": layer.self_attn.q_proj, "k_proj": layer.self_attn.k_proj,
                "v_proj": layer.self_attn.v_proj, "o_proj": layer.self_attn.o_proj,
                "gate_proj": layer.mlp.gate_proj, "up_proj": layer.mlp.up_proj,
                "down_proj": layer.mlp.down_proj,
            }
            w, b, lora = {}, {}, {}
            for name, mod in mods.items():
                lin = mod.base_layer if hasattr(mod, "base_layer") else mod
                w[name] = lin.weight
                if lin.bias is not None:
                    b[name] = lin.bias
                if hasattr(mod, "lora_A") and self.adapter in mod.lora_A:
                    lora[name] = mod
            self.layers.append(
                _Layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight, w, b, lora, {})
            )
        self.device = self.embed.device
        self.dtype = self.embed.dtype
        self.dnn = onednn_linear_available(self.device, self.dtype)
        self.pack = self.dnn and onednn_packing_available(self.device, self.dtype)
        self.lm_head_t = None
        self.lm_head_p = self.lm_head
        if self.dnn:
            # For oneDNN: lm_head^T (the log-prob backward's product) and, where packing runs, the
            # frozen base weights and lm_head packed (`_packed`); kept across syncs while the
            # base tensor is the same and unmodified.
            old: dict[tuple[int, bool], tuple[Tensor, int, Tensor]] = getattr(self, "_dnn_cache", {})
            cache: dict[tuple[int, bool], tuple[Tensor, int, Tensor]] = {}

            def for_dnn(t: Tensor, transpose: bool) -> Tensor:
                key = (id(t), transpose)
                hit = old.get(key)
                if hit is not None and hit[0] is t and hit[1] == t._version:
                    cache[key] = hit
                    return hit[2]
                with torch.no_grad():
                    out = t.t().contiguous() if transpose else t
                    if self.pack and not t.requires_grad:
                        out = _packed(out)
                cache[key] = (t, t._version, out)
                return out

            if self.pack:
                for lay in self.layers:
                    lay.wp = {name: for_dnn(t, False) for name, t in lay.w.items()}
            self.lm_head_t = for_dnn(self.lm_head, True)  # (H, V)
            self.lm_head_p = for_dnn(self.lm_head, False) if self.pack else self.lm_head  # (V, H)
            self._dnn_cache = cache

    @torch.no_grad()
    def sync(self, model: Any | None = None) -> None:
        """(Re)collect the weight references and merge the current adapter into the generation
        weights: W^T + scaling A^T B^T into new tensors; the base tensors are left bit-identical."""
        self._collect(self.model if model is None else model)
        gen: list[_GenLayer] = []
        for lay in self.layers:
            zeros = torch.zeros(lay.w["k_proj"].shape[0], dtype=self.dtype, device=self.device)
            gen.append(
                _GenLayer(
                    ln1=lay.ln1,
                    ln2=lay.ln2,
                    qkv_t=self._merged_t(lay, ("q_proj", "k_proj", "v_proj")),
                    qkv_b=torch.cat([lay.b.get(n, zeros) for n in ("q_proj", "k_proj", "v_proj")]),
                    o_t=self._merged_t(lay, ("o_proj",)),
                    gate_up_t=self._merged_t(lay, ("gate_proj", "up_proj")),
                    down_t=self._merged_t(lay, ("down_proj",)),
                )
            )
        self.gen_layers = gen
        # lm_head^T for the sampling loop: the frozen head transposed once on CPU (kept across
        # syncs while it is unmodified); a view elsewhere
        head = self.lm_head
        cached = getattr(self, "_head_t", None)
        if head.device.type != "cpu":
            self._head_t = (head, head._version, head.t())
        elif cached is None or cached[0] is not head or cached[1] != head._version:
            self._head_t = (head, head._version, head.t().contiguous())
        self.lm_head_gen = self._head_t[2]  # (H, V)

    def _merged_t(self, lay: _Layer, names: tuple[str, ...]) -> Tensor:
        """W^T + scaling A^T B^T of the named projections side by side: (in, sum of outs), a
        new tensor (the base weights are never written). The merge runs in float32 when the
        base is in a lower precision, then is cast, as peft's merge does."""
        ws = [lay.w[name] for name in names]  # (out_i, in) each
        merged = torch.empty(ws[0].shape[1], sum(w.shape[0] for w in ws), dtype=self.dtype, device=self.device)
        col = 0
        for name, w in zip(names, ws):
            dst = merged[:, col : col + w.shape[0]]  # (in, out_i)
            col += w.shape[0]
            mod = lay.lora.get(name)
            if mod is None or getattr(mod, "disable_adapters", False):
                dst.copy_(w.t())
                continue
            a, b = mod.lora_A[self.adapter].weight, mod.lora_B[self.adapter].weight  # (r, in), (out_i, r)
            scale = float(mod.scaling[self.adapter])
            if w.dtype == a.dtype == torch.float32:
                dst.copy_(w.t()).addmm_(a.t(), b.t(), alpha=scale)
            else:
                dst.copy_(torch.addmm(w.t().float(), a.t().float(), b.t().float(), alpha=scale))
        return merged  # (in, sum of outs)

    def _decode_packs(self, gemm: MklGemm, rows: int) -> list[dict[str, PackedMatrix]]:
        """The generation weights of every layer (qkv, o, gate_up, down) and the head ("head", in
        the last entry), packed for MKL's GEMM with `rows` rows (one more copy of them); kept
        until the next `sync`."""
        cached = getattr(self, "_packs", None)
        if cached is not None and cached[0] is self.gen_layers and cached[1] == rows:
            return cached[2]
        weights = [{name: getattr(g, name + "_t") for name in ("qkv", "o", "gate_up", "down")} for g in self.gen_layers]
        weights[-1]["head"] = self.lm_head_gen
        names = [(i, name) for i, layer in enumerate(weights) for name in layer]
        packs: list[dict[str, PackedMatrix]] = [{} for _ in weights]
        for (i, name), packed in zip(names, gemm.pack([weights[i][name] for i, name in names], rows)):
            packs[i][name] = packed
        self._packs = (self.gen_layers, rows, packs)
        return packs

    def _decode_step(
        self, native: NativeKernels, gemm: MklGemm, layer_caches: list[tuple[Tensor, ...]], prompt_mask: Tensor,
        rows: Tensor,
    ) -> DecodeStep:  # fmt: skip
        """The whole decode step as one native call, over all weights packed for MKL."""
        packs = self._decode_packs(gemm, rows.shape[0])
        layers = [
            {"ln1": g.ln1, "ln2": g.ln2, "qkv_bias": g.qkv_b, "prompt_k": pk, "prompt_v": pv, "k_cache": kc,
             "v_cache": vc, **{name: pack[name] for name in ("qkv", "o", "gate_up", "down")}}
            for g, pack, (pk, pv, kc, vc) in zip(self.gen_layers, packs, layer_caches)
        ]  # fmt: skip
        dims = {"n": rows.shape[0], "h": self.hidden_size, "inter": self.gen_layers[0].down_t.shape[0],
                "hq": self.num_heads, "hkv": self.num_kv_heads, "d": self.head_dim}  # fmt: skip
        head = packs[-1]["head"]
        return DecodeStep(native, gemm, layers, self.embed, self.norm, head, prompt_mask, rows, dims, self.eps)

    # -- building blocks ---------------------------------------------------------------------

    def _rms(self, x: Tensor, weight: Tensor) -> Tensor:
        """Qwen2RMSNorm: float32 statistics, weight applied in the input dtype."""
        if x.dtype == torch.float32:
            if x.device.type != "cpu" or weight.requires_grad:
                return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
            if torch.is_grad_enabled() and x.requires_grad:
                return _RMSNorm.apply(x, weight, self.eps)
            return _rms_norm(x, weight, self.eps)[0]
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    def _rope(self, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin of Qwen2RotaryEmbedding at `pos` (..., L) -> (..., L, D) each."""
        freqs = pos[..., None].float() * self.inv_freq.to(pos.device)  # (..., L, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (..., L, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _project(
        self, x: Tensor, lay: _Layer, names: tuple[str, ...], use_adapter: bool, residual: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        """x W^T + b (+ residual, one projection only), plus (dropout(x) A^T B^T) * scaling when
        the adapter is on, for projections that read the same x (..., in): `_LoraProjections`.

        As peft's lora.Linear: dropout (p of the module's lora_dropout, only while that module is
        in training mode) draws its own mask for each projection, in order, from the global RNG
        (`dropped_positions` on CPU, `dropout_keep` elsewhere); 1 / (1 - p) goes into the scaling.
        """
        if residual is not None and len(names) != 1:
            raise ValueError("a residual is added to one projection only")
        projs, ab = [], []
        for name in names:
            w = lay.w[name]  # (out, in)
            pr = _Projection(w, lay.wp.get(name, w) if self.dnn else w, lay.b.get(name), lora=False)
            mod = lay.lora.get(name) if use_adapter else None
            if mod is not None and not mod.disable_adapters:
                ab += [mod.lora_A[self.adapter].weight, mod.lora_B[self.adapter].weight]  # (r, in), (out, r)
                pr.lora, pr.scale = True, float(mod.scaling[self.adapter])
                drop = mod.lora_dropout[self.adapter]
                p = float(getattr(drop, "p", 0.0))
                if drop.training and p > 0:
                    pr.scale /= 1.0 - p
                    if x.device.type == "cpu" and p <= 0.25:  # sparse: the positions of the dropped entries
                        pr.drops = dropped_positions(x.numel(), p, x.device)  # (k,)
                    else:
                        pr.keep = dropout_keep(tuple(x.shape), p, ab[-2].dtype, x.device)  # (..., in)
            projs.append(pr)
        return _LoraProjections.apply(x, residual, projs, *ab)

    def _proj(
        self, x: Tensor, lay: _Layer, name: str, use_adapter: bool, residual: Tensor | None = None
    ) -> Tensor:
        """One projection of `_project`: x (..., in) -> (..., out)."""
        return self._project(x, lay, (name,), use_adapter, residual)[0]

    def _layer_qkv(
        self, x: Tensor, lay: _Layer, gen: _GenLayer | None, use_adapter: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q (n, L, Hq D), k, v (n, L, Hkv D) of a normed input x (n, L, H)."""
        if gen is not None:
            qkv = _mm(x, gen.qkv_t, gen.qkv_b)  # (n, L, (Hq + 2 Hkv) D)
            dq, dk = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            return qkv[..., :dq], qkv[..., dq : dq + dk], qkv[..., dq + dk :]
        q, k, v = self._project(x, lay, ("q_proj", "k_proj", "v_proj"), use_adapter)
        return q, k, v

    def _mlp(
        self, x: Tensor, lay: _Layer, gen: _GenLayer | None, use_adapter: bool, residual: Tensor
    ) -> Tensor:
        """residual + down(silu(gate(x)) * up(x)) for a normed x (n, L, H)."""
        if gen is not None:
            gate, up = _mm(x, gen.gate_up_t).chunk(2, dim=-1)  # (n, L, I) each
            return _mm(_swiglu(gate, up), gen.down_t, add=residual)  # (n, L, H)
        gate, up = self._project(x, lay, ("gate_proj", "up_proj"), use_adapter)  # (n, L, I) each
        return self._proj(_swiglu(gate, up), lay, "down_proj", use_adapter, residual)  # (n, L, H)

    def _o(
        self, x: Tensor, lay: _Layer, gen: _GenLayer | None, use_adapter: bool, residual: Tensor
    ) -> Tensor:
        """residual + o_proj(x) for the attention output x (n, L, Hq D)."""
        if gen is not None:
            return _mm(x, gen.o_t, add=residual)  # (n, L, H)
        return self._proj(x, lay, "o_proj", use_adapter, residual)

    @staticmethod
    def _rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
        """x * cos + rotate_half(x) * sin, with rotate_half's sign folded into `signed_sin`."""
        if torch.is_grad_enabled() and x.requires_grad:
            return _Rotary.apply(x, cos, signed_sin)
        return _rotary(x, cos, signed_sin)

    def _rope_signed(self, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sign * sin at `pos` (..., L) -> (..., L, D); sign = -1 on the first half."""
        cos, sin = self._rope(pos, dtype)
        half = cos.shape[-1] // 2
        sign = torch.ones(cos.shape[-1], dtype=dtype, device=cos.device)  # (D,)
        sign[:half] = -1
        return cos, sin * sign

    @staticmethod
    def _attend(
        q: Tensor, k: Tensor, v: Tensor, mask: Tensor, prefix: tuple[Tensor, Tensor, Tensor] | None,
        cos: Tensor, signed_sin: Tensor,
    ) -> Tensor:  # fmt: skip
        """softmax(R q (R k)^T / sqrt(D) + mask) v for unrotated q (n, Hq, L, D), k, v (n, Hkv, L, D),
        R the rotary embedding at cos, signed_sin (n, L, D), mask (n, 1, L, Lp + L) additive ->
        (n, Hq, L, D). `prefix` = (keys (rotated), values (U, Hkv, Lp, D), rows (n,)): row i's
        first Lp keys/values are those of rows[i]. The native kernels' attention (`_Attention` in
        autograd) for float32 CPU heads of a multiple of 16, which rotates q and k itself and reads
        the prefix in place; else `_rotate`, the prefix repeated for the rows and torch's fused
        kernel."""
        native = kernels()
        if native is not None and _Attention.applies(native, q, k, v, mask, prefix) and cos.is_contiguous():
            if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *(prefix or ())[:2])):
                return _Attention.apply(q, k, v, mask, *(prefix or (None, None, None)), cos, signed_sin)
            return native.attention(q, k, v, mask, keep_probs=False, prefix=prefix, rope=(cos, signed_sin))[0]
        q = FastQwen2._rotate(q, cos[:, None], signed_sin[:, None])  # (n, Hq, L, D)
        k = FastQwen2._rotate(k, cos[:, None], signed_sin[:, None])  # (n, Hkv, L, D)
        if prefix is not None:
            pk, pv, rows = prefix
            k = torch.cat([pk.index_select(0, rows), k], dim=2)  # (n, Hkv, Lp + L, D)
            v = torch.cat([pv.index_select(0, rows), v], dim=2)  # (n, Hkv, Lp + L, D)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])

    def _heads(self, x: Tensor, heads: int) -> Tensor:
        """(n, L, heads D) -> (n, heads, L, D)."""
        n, length, _ = x.shape
        return x.view(n, length, heads, self.head_dim).transpose(1, 2)

    # -- full-sequence forward ------------------------------------------------------------------

    def hidden_states(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        use_adapter: bool = True,
        merged: bool = False,
        kv_out: list[tuple[Tensor, Tensor]] | None = None,
        prefix_kv: list[tuple[Tensor, Tensor]] | None = None,
        prefix_rows: Tensor | None = None,
        prefix_mask: Tensor | None = None,
    ) -> Tensor:
        """Final-layer hidden states (n, L, H), before the final norm.

        `merged=True` runs the generation weights (adapter merged); otherwise the base weights
        with the LoRA unmerged when `use_adapter`. Position ids count real tokens (left padding).
        `kv_out` collects each layer's rotated keys and values (n, Hkv, L, D). `prefix_kv`
        (each layer's (U, Hkv, Lp, D)), `prefix_rows` (n,) and `prefix_mask` (n, Lp) continue
        sequences whose first Lp tokens were already run: row i attends to the keys/values of
        prefix row prefix_rows[i], whose real tokens count in its position ids.
        """
        n, length = input_ids.shape
        mask = attention_mask.long()  # (n, L)
        if prefix_mask is None:
            pos = (mask.cumsum(1) - 1).clamp(min=0)  # (n, L)
            key_valid = mask.bool()  # (n, L)
            seen = mask.cumsum(1) > 0  # (n, L) a real token at or before each query
            lp = 0
        else:
            before = prefix_mask.long().sum(1, keepdim=True) + mask.cumsum(1)  # (n, L) real tokens so far
            pos = (before - 1).clamp(min=0)  # (n, L)
            key_valid = torch.cat([prefix_mask.bool(), mask.bool()], dim=1)  # (n, Lp + L)
            seen = before > 0  # (n, L)
            lp = prefix_mask.shape[1]
        # Query i sees keys j <= i that are real tokens; a query with no real token at or before it
        # (left padding) sees itself only, which keeps its (unused) outputs finite.
        q_idx = torch.arange(length, device=input_ids.device) + lp  # (L,)
        k_idx = torch.arange(lp + length, device=input_ids.device)  # (Lp + L,)
        causal = k_idx[None, :] <= q_idx[:, None]  # (L, Lp + L)
        allowed = causal[None] & key_valid[:, None, :]  # (n, L, Lp + L)
        allowed = allowed | ((k_idx[None, :] == q_idx[:, None])[None] & ~seen[:, :, None])  # (n, L, Lp + L)
        zero = torch.zeros((), dtype=self.dtype, device=input_ids.device)
        attn_mask = zero.masked_fill(~allowed, float("-inf"))[:, None]  # (n, 1, L, Lp + L) additive
        hq, hkv = self.num_heads, self.num_kv_heads

        x = F.embedding(input_ids, self.embed)  # (n, L, H)
        cos, sin = self._rope_signed(pos, x.dtype)  # (n, L, D) each
        for i, lay in enumerate(self.layers):
            gen = self.gen_layers[i] if merged else None
            h = self._rms(x, gen.ln1 if gen is not None else lay.ln1)  # (n, L, H)
            q, k, v = self._layer_qkv(h, lay, gen, use_adapter)
            q, k, v = self._heads(q, hq), self._heads(k, hkv), self._heads(v, hkv)  # (n, H*, L, D), unrotated
            if kv_out is not None:
                kv_out.append((self._rotate(k, cos[:, None], sin[:, None]), v))
            prefix = (*prefix_kv[i], prefix_rows) if prefix_kv is not None else None
            o = self._attend(q, k, v, attn_mask, prefix, cos, sin)  # (n, Hq, L, D)
            o = o.transpose(1, 2).reshape(n, length, hq * self.head_dim)  # (n, L, Hq D)
            x = self._o(o, lay, gen, use_adapter, x)  # (n, L, H): residual added
            h = self._rms(x, gen.ln2 if gen is not None else lay.ln2)  # (n, L, H)
            x = self._mlp(h, lay, gen, use_adapter, x)  # (n, L, H): residual added
        return x

    def logits(self, hidden: Tensor) -> Tensor:
        """Final norm + lm_head: (..., H) -> (..., V)."""
        return _mm(self._rms(hidden, self.norm), self.lm_head_gen)

    # -- sampling -------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        num_samples: int,
        *,
        max_new_tokens: int,
        min_new_tokens: int = 0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop_ids: list[int] | tuple[int, ...] = (),
        pad_id: int = 0,
        greedy: bool = False,
        generator: torch.Generator | None = None,
        rows: Tensor | None = None,
        sampler: str = "multinomial",
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Sample completions of U left-padded prompts with the merged generation weights.

        `rows` (N,) is the unique prompt of each output row (default: each prompt repeated
        `num_samples` times, rows grouped). Returns completion_ids (N, T) right-padded with
        `pad_id` (T <= max_new_tokens: the loop stops early once every row has stopped),
        lengths (N,) tokens up to and including the first stop token (max_new_tokens if none),
        finished (N,) bool. Same token choice and stopping as the `hf` engine (with
        sampler="multinomial"; see `pick_tokens`).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler is {sampler!r}; use one of {SAMPLERS}")
        if max_new_tokens < 1 or num_samples < 1 or prompt_ids.shape[0] < 1:
            raise ValueError("generate needs at least one prompt, num_samples >= 1, max_new_tokens >= 1")
        dev = self.device
        u_ids, u_mask = prompt_ids.to(dev), prompt_mask.to(dev).long()  # (U, P), (U, P)
        u, p = u_ids.shape
        if rows is None:
            rows = torch.arange(u, device=dev).repeat_interleave(num_samples)  # (N,)
        rows = rows.to(dev, torch.long).contiguous()
        n, t_max = int(rows.shape[0]), int(max_new_tokens)
        min_new_tokens = min(min_new_tokens, t_max)
        hkv, d, hq = self.num_kv_heads, self.head_dim, self.num_heads
        rep = hq // hkv
        span = p + t_max
        scale = d**-0.5

        # Prefill every unique prompt once.
        kv: list[tuple[Tensor, Tensor]] = []
        hidden = self.hidden_states(u_ids, u_mask, merged=True, kv_out=kv)  # (U, P, H)
        logits = self.logits(hidden[:, -1]).float().index_select(0, rows)  # (N, V)
        del hidden
        # The native attention step (rotary, cache write, attention in one kernel) reads each
        # prompt's keys/values where they are and keeps this generation's in T slots per row;
        # torch's operators attend over caches of P + T slots per row, the prompt's copied in.
        native = kernels() if dev.type == "cpu" and self.dtype == torch.float32 else None
        if native is not None:
            prompt_mask = torch.zeros(u, p, dtype=self.dtype, device=dev)  # (U, P) additive
            prompt_mask.masked_fill_(u_mask == 0, float("-inf"))
            slots = (n, hkv, t_max, d)
            # per layer: prompt keys, values (U, Hkv, P, D); generated keys, values (N, Hkv, T, D)
            layer_caches = [
                (k.contiguous(), v.contiguous(), torch.empty(slots, dtype=self.dtype, device=dev),
                 torch.empty(slots, dtype=self.dtype, device=dev))
                for k, v in kv
            ]  # fmt: skip
            # with MKL: the whole step (every layer, norm and head) in one native call
            gemm = mkl_gemm()
            step = self._decode_step(native, gemm, layer_caches, prompt_mask, rows) if gemm is not None else None
            if step is None:  # the loop below calls the attention kernel: (N, Hq D) its output
                att_out = torch.empty(n, hq * d, dtype=self.dtype, device=dev)
        else:
            step = None
            # -inf on prompt padding, 0 on real and new tokens; repeated for the key/value heads
            row_mask = torch.zeros(n, span, dtype=self.dtype, device=dev)  # (N, P+T)
            row_mask[:, :p].masked_fill_(u_mask.index_select(0, rows) == 0, float("-inf"))
            add_mask = row_mask.repeat_interleave(hkv, dim=0)[:, None, :]  # (N Hkv, 1, P+T)
            # per layer: caches (N, Hkv, P+T, D), keys^T (N Hkv, D, P+T) and values (N Hkv, P+T, D) views
            layer_caches = []
            for k, v in kv:
                kc = torch.empty(n, hkv, span, d, dtype=self.dtype, device=dev)
                vc = torch.empty(n, hkv, span, d, dtype=self.dtype, device=dev)
                kc[:, :, :p].copy_(k.index_select(0, rows))
                vc[:, :, :p].copy_(v.index_select(0, rows))
                layer_caches.append((kc, vc, kc.view(n * hkv, span, d).transpose(1, 2), vc.view(n * hkv, span, d)))
        del kv

        # Rotary tables of every decode step: positions next_pos + t.
        u_pos = (u_mask.cumsum(-1) - 1).clamp(min=0)  # (U, P)
        next_pos = u_pos[:, -1].index_select(0, rows) + 1  # (N,)
        steps_pos = next_pos[None, :] + torch.arange(t_max, device=dev)[:, None]  # (T, N)
        cos, sin = self._rope_signed(steps_pos, self.dtype)  # (T, N, D)
        half = d // 2
        cos = cos[:, :, None, :].contiguous()  # (T, N, 1, D)
        sin = sin[:, :, None, :].contiguous()  # (T, N, 1, D): rotate_half's sign folded in

        layers, head = self.gen_layers, self.lm_head_gen  # head: (H, V)
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=dev)  # (S,)
        # -inf on the stop tokens, added to the logits while min_new_tokens is not reached
        no_stop = torch.zeros(head.shape[1], dtype=torch.float32, device=dev)  # (V,)
        no_stop.index_fill_(0, stop, float("-inf"))
        tokens: list[Tensor] = []  # (N,) each
        finished = torch.zeros(n, dtype=torch.bool, device=dev)  # (N,)
        lengths = torch.full((n,), t_max, dtype=torch.long, device=dev)  # (N,)
        pad_tok = torch.full((n,), pad_id, dtype=torch.long, device=dev)  # (N,)
        qk_dim = (hq + hkv) * d
        embed, norm, rms = self.embed, self.norm, self._rms
        # the native sampler draws pick_tokens' inverse-CDF token (no top-k / top-p) in one pass,
        # from the same uniforms of `generator`
        one_pass = native is not None and sampler == "inverse_cdf" and not greedy and top_k == 0 and top_p >= 1.0
        for t in range(t_max):
            block = t < min_new_tokens and stop.numel() > 0  # the stop tokens get -inf
            if one_pass:
                u = torch.rand(n, 1, dtype=torch.float64, generator=generator)  # (N, 1)
                token = native.sample_inverse_cdf(logits, no_stop if block else None, temperature, u)  # (N,)
            else:
                logits = logits + no_stop if block else logits  # (N, V)
                token = pick_tokens(logits, greedy, generator, temperature, top_k, top_p, sampler)  # (N,)
            if t >= min_new_tokens:  # before that, no row can stop
                token = torch.where(finished, pad_tok, token)  # (N,)
                hit = torch.isin(token, stop) & ~finished  # (N,)
                lengths = torch.where(hit, torch.full_like(lengths, t + 1), lengths)  # (N,)
                finished = finished | hit  # (N,)
            tokens.append(token)
            if t == t_max - 1 or (t >= min_new_tokens and bool(finished.all())):
                break
            # One decode step for all N rows: token t at slot t (native) or P + t (torch's caches).
            slot, length = p + t, p + t + 1
            c, s = cos[t], sin[t]  # (N, 1, D)
            if step is not None:
                logits = step(token, c, s, t)  # (N, V), overwritten by the next step
                continue
            x = F.embedding(token, embed)  # (N, H)
            for cache, g in zip(layer_caches, layers):
                h = rms(x, g.ln1)
                if native is not None:  # the kernel adds the bias
                    pk, pv, kc, vc = cache
                    qkv = torch.mm(h, g.qkv_t)  # (N, (Hq + 2 Hkv) D)
                    att = native.decode_attention(
                        qkv, g.qkv_b, c, s, pk, pv, prompt_mask, rows, kc, vc, att_out, t, scale
                    )  # (N, Hq D)
                else:
                    kc, vc, keys_t, values = cache
                    qkv = torch.addmm(g.qkv_b, h, g.qkv_t)  # (N, (Hq + 2 Hkv) D)
                    qk = qkv[:, :qk_dim].view(n, hq + hkv, d)  # (N, Hq + Hkv, D)
                    qk = torch.addcmul(qk * c, torch.roll(qk, half, dims=-1), s)  # (N, Hq + Hkv, D)
                    kc[:, :, slot].copy_(qk[:, hq:])
                    vc[:, :, slot].copy_(qkv[:, qk_dim:].view(n, hkv, d))
                    q = qk[:, :hq].reshape(n * hkv, rep, d)  # (N Hkv, rep, D)
                    # (N Hkv, rep, L)
                    att = torch.baddbmm(add_mask[:, :, :length], q, keys_t[:, :, :length], alpha=scale)
                    att = torch.bmm(att.softmax(dim=-1), values[:, :length])  # (N Hkv, rep, D)
                    att = att.view(n, hq * d)  # (N, Hq D)
                x = x.addmm_(att, g.o_t)  # (N, H): the residual stream, updated in place
                h = rms(x, g.ln2)
                gate, up = torch.mm(h, g.gate_up_t).chunk(2, dim=-1)  # (N, I) each
                x = x.addmm_(_swiglu(gate, up), g.down_t)  # (N, H)
            h = rms(x, norm)
            logits = torch.mm(h, head).float()  # (N, V)
        out = torch.stack(tokens, dim=1)  # (N, steps)
        return out, lengths, finished


# --------------------------------------------------------------------------- log-probs


def _as_fast(model_or_fast: Any) -> FastQwen2:
    if isinstance(model_or_fast, FastQwen2):
        return model_or_fast
    fast = FastQwen2.__new__(FastQwen2)
    reason = unsupported_reason(model_or_fast)
    if reason is not None:
        raise ValueError(f"FastQwen2 does not cover this model: {reason}; use the Hugging Face path")
    fast._collect(model_or_fast)  # references only: no generation weights needed here
    return fast


def _group_prompts(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor] | None:
    """(first row of each distinct prompt (U,), distinct prompt of each row (N,)), or None when
    every row is distinct (nothing to share)."""
    key = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], dim=1)  # (N, 2P)
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)  # (U, 2P), (N,)
    if uniq.shape[0] == key.shape[0]:
        return None
    n = key.shape[0]
    first = torch.full((uniq.shape[0],), n, dtype=torch.long, device=key.device)
    first = first.scatter_reduce(0, inverse, torch.arange(n, device=key.device), reduce="amin")  # (U,)
    return first, inverse


def completion_logprobs_fast(
    model_or_fast: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    use_adapter: bool = True,
    *,
    micro_batch_size: int | None = None,
    share_prompts: bool = True,
    with_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token log-probs (N, T) of the completion tokens; the fast twin of
    `grpo.algorithm.completion_logprobs` (same values within float rounding, same gradients).

    `model_or_fast`: a FastQwen2 or a model that `supports()`. The LoRA runs unmerged with peft's
    own parameters (dropout when its module is in training mode), so `backward()` fills their
    grads; `use_adapter=False` (or peft's `disable_adapter()` context) gives the base model,
    e.g. the reference pass under `torch.no_grad()`. `share_prompts` runs each distinct prompt
    of a block once and repeats its keys/values for its rows. `with_entropy`: also each position's
    entropy (N, T), from the same logits, without a gradient.
    """
    fast = _as_fast(model_or_fast)
    out = in_row_blocks(
        lambda *block: _block_logprobs(fast, *block, temperature, use_adapter, share_prompts, with_entropy),
        (prompt_ids, prompt_mask, completion_ids, completion_mask),
        micro_batch_size,
    )  # (N, T), or (N, T, 2) with the entropy
    return (out[..., 0], out[..., 1].detach()) if with_entropy else out


def _block_logprobs(
    fast: FastQwen2,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float,
    use_adapter: bool,
    share_prompts: bool,
    with_entropy: bool = False,
) -> Tensor:
    """One forward over a block of rows -> (n, T), or (n, T, 2) with the entropy; position
    P - 1 + j predicts completion token j."""
    dev = fast.device
    prompt_ids, prompt_mask = prompt_ids.to(dev), prompt_mask.to(dev).long()  # (n, P), (n, P)
    completion_ids, completion_mask = completion_ids.to(dev), completion_mask.to(dev).long()  # (n, T)
    p, t = prompt_ids.shape[1], completion_ids.shape[1]
    groups = _group_prompts(prompt_ids, prompt_mask) if share_prompts else None
    if groups is None:
        # The last completion token predicts nothing: it is left out of the input.
        ids = torch.cat([prompt_ids, completion_ids[:, : t - 1]], dim=1)  # (n, P+T-1)
        mask = torch.cat([prompt_mask, completion_mask[:, : t - 1]], dim=1)  # (n, P+T-1)
        hidden = fast.hidden_states(ids, mask, use_adapter=use_adapter)[:, p - 1 :]  # (n, T, H)
    else:
        first, inverse = groups  # (U,), (n,)
        kv: list[tuple[Tensor, Tensor]] = []
        u_mask = prompt_mask.index_select(0, first)  # (U, P)
        u_hidden = fast.hidden_states(
            prompt_ids.index_select(0, first), u_mask, use_adapter=use_adapter, kv_out=kv
        )  # (U, P, H)
        last = u_hidden[:, -1:].index_select(0, inverse)  # (n, 1, H)
        if t == 1:
            hidden = last  # (n, 1, H)
        else:
            c_hidden = fast.hidden_states(
                completion_ids[:, : t - 1],
                completion_mask[:, : t - 1],
                use_adapter=use_adapter,
                prefix_kv=kv,
                prefix_rows=inverse,
                prefix_mask=prompt_mask,
            )  # (n, T-1, H): each row attends to its prompt's keys/values (U, Hkv, P, D)
            hidden = torch.cat([last, c_hidden], dim=1)  # (n, T, H)
    normed = fast._rms(hidden, fast.norm)  # (n, T, H)
    entropy = torch.empty(completion_ids.shape, dtype=torch.float32, device=dev) if with_entropy else None  # (n, T)
    logp = selective_head_logprobs(
        normed,
        fast.lm_head_p if fast.dnn else fast.lm_head,
        completion_ids,
        temperature,
        dnn=fast.dnn,
        weight_t=fast.lm_head_t,
        entropy_out=entropy,
    )  # (n, T)
    return logp if entropy is None else torch.stack([logp, entropy.to(logp.dtype)], dim=-1)  # (n, T, 2)


def _chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows of logits per chunk: about 1 MiB of float32 on CPU (stays in cache), 256 MiB on GPU."""
    budget = 2**18 if device.type == "cpu" else 2**26
    return max(1, budget // max(vocab, 1))


def _head_logits(h: Tensor, weight: Tensor, temperature: float, acc: torch.dtype, dnn: bool) -> Tensor:
    """(h W^T / temperature) in the accumulation dtype: (c, H) -> (c, V)."""
    logits = _dnn(h, weight, None, None) if dnn else torch.mm(h, weight.t())  # (c, V)
    if temperature != 1.0:
        logits = logits / temperature  # (c, V)
    return logits if logits.dtype == acc else logits.to(acc)  # logsumexp in half precision is too inexact


def _head_forward(
    h: Tensor, weight: Tensor, target: Tensor, temperature: float, keep: list[Tensor] | None, dnn: bool,
    entropy: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """log softmax(h W^T / temperature)[target] and the logsumexp, chunk by chunk.

    h (M, H), weight (V, H), target (M,); `keep`, when given, collects each chunk's logits;
    `entropy` (M,), when given, receives each row's entropy lse - sum(softmax * logits).
    Returns logp (M,) and lse (M,) in float32 (or float64 for float64 inputs).
    """
    m, v = h.shape[0], weight.shape[0]
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    logp = torch.empty(m, dtype=acc, device=h.device)  # (M,)
    lse = torch.empty(m, dtype=acc, device=h.device)  # (M,)
    step = _chunk_rows(v, h.device)
    for s in range(0, m, step):
        e = min(m, s + step)
        logits = _head_logits(h[s:e], weight, temperature, acc, dnn)  # (c, V)
        if keep is not None:
            keep.append(logits)
        torch.logsumexp(logits, dim=-1, out=lse[s:e])
        torch.sub(logits.gather(1, target[s:e, None])[:, 0], lse[s:e], out=logp[s:e])
        if entropy is not None:
            probs = (logits - lse[s:e, None]).exp_()  # (c, V)
            entropy[s:e] = lse[s:e] - (probs * logits).sum(dim=-1)  # (c,)
    return logp, lse


class _SelectiveHead(torch.autograd.Function):
    """logp = log softmax(h W^T / temperature)[target] without a (M, V) autograd graph.

    The logits are formed chunk by chunk (kept in cache); the backward, per chunk,
    d logp / d logits = (onehot(target) - softmax) / temperature, then one matmul back to h
    (and to W when it needs a gradient). Logits are kept from the forward when they fit in
    256 MiB, otherwise recomputed in the backward.
    """

    @staticmethod
    def forward(
        ctx: Any, h: Tensor, weight: Tensor, target: Tensor, temperature: float, dnn: bool,
        weight_t: Tensor | None, entropy: Tensor | None,
    ) -> Tensor:
        m, v = h.shape[0], weight.shape[0]
        keep: list[Tensor] | None = [] if m * v * 4 <= 2**28 else None
        logp, lse = _head_forward(h, weight, target, temperature, keep, dnn, entropy)
        ctx.save_for_backward(h, weight, target, lse, weight_t)
        ctx.keep, ctx.temperature, ctx.dnn = keep, temperature, dnn
        return logp

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        h, weight, target, lse, weight_t = ctx.saved_tensors
        temperature, keep, dnn = ctx.temperature, ctx.keep, ctx.dnn
        m, v = h.shape[0], weight.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None  # (M, H)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_w else None  # (V, H)
        if want_h and dnn and weight_t is None:
            weight_t = weight.t().contiguous()  # (H, V)
        g = grad.to(lse.dtype)  # (M,)
        step = _chunk_rows(v, h.device)
        for i, s in enumerate(range(0, m, step)):
            e = min(m, s + step)
            if keep is not None:
                probs = keep[i].sub_(lse[s:e, None])  # (c, V), in place: the forward's logits are done
            else:
                logits = _head_logits(h[s:e], weight, temperature, lse.dtype, dnn)  # (c, V)
                probs = logits.sub_(lse[s:e, None])  # (c, V)
            probs.exp_().mul_(-g[s:e, None])  # (c, V): -softmax * g
            probs.scatter_add_(1, target[s:e, None], g[s:e, None])  # (c, V): + onehot * g
            if temperature != 1.0:
                probs.div_(temperature)
            dlogits = probs.to(h.dtype)  # (c, V)
            if grad_h is not None:
                grad_h[s:e] = _dnn(dlogits, weight_t, None, None) if dnn else torch.mm(dlogits, weight)
            if grad_w is not None:
                grad_w.addmm_(dlogits.t().float(), h[s:e].float())
        ctx.keep = None
        return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None), None, None, None, None, None


def selective_head_logprobs(
    h: Tensor,
    weight: Tensor,
    target: Tensor,
    temperature: float = 1.0,
    *,
    dnn: bool = False,
    weight_t: Tensor | None = None,
    entropy_out: Tensor | None = None,
) -> Tensor:
    """log softmax(h W^T / temperature)[target] (n, T) for normed hidden states h (n, T, H) and
    an lm_head weight (V, H), without materialising an autograd graph over (n, T, V).
    `dnn` / `weight_t` (W^T contiguous): run the GEMMs through oneDNN. `entropy_out` (n, T)
    float32, when given, receives each position's entropy (no gradient)."""
    n, t, hsz = h.shape
    flat_h = h.reshape(n * t, hsz)  # (M, H)
    flat_t = target.reshape(n * t)  # (M,)
    flat_e = entropy_out.view(n * t) if entropy_out is not None else None  # (M,)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        logp = _SelectiveHead.apply(flat_h, weight, flat_t, float(temperature), dnn, weight_t, flat_e)  # (M,)
    else:
        logp, _ = _head_forward(flat_h, weight, flat_t, float(temperature), None, dnn, flat_e)  # (M,)
    return logp.view(n, t)
