"""The Qwen2 fast path against the plain Hugging Face path: log-probs, loss gradients, sampling.

Run: `pytest -q tests/test_fastpath.py`. Two random Qwen2 models (hidden 64 / 2 layers as the
benchmark's tiny one, and the project's tiny model), each with a LoRA whose B is randomised so
the adapter changes the output. The plain path (`grpo.algorithm.completion_logprobs`,
`grpo.engines.hf.HFEngine`) and an unpadded per-row forward are the references.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import grpo.engines.cpu_fast.qwen2 as fastpath_module
from grpo.algorithm import completion_logprobs, grpo_loss
from grpo.config import GenerationConfig, LoraConfig, ModelConfig
from grpo.engines.base import keep_freed_memory, pick_tokens
from grpo.engines.cpu_fast import CpuFastEngine
from grpo.engines.cpu_fast.native import kernels
from grpo.engines.cpu_fast.qwen2 import (
    FastQwen2,
    completion_logprobs_fast,
    dropout_keep,
    dropped_positions,
    onednn_linear_available,
    onednn_packing_available,
    rope_parameters,
    selective_head_logprobs,
    supports,
    torch_dropped_positions,
    unsupported_reason,
)
from grpo.engines.hf import HFEngine
from grpo.models import attach_lora, build_tiny_model, load_base_model, load_tokenizer, stop_token_ids

PROMPTS = [
    "nums: 1 2 3 target: 6\n",
    "nums: 93 4 68 target: 29, and a much longer prompt than the others\n",
    "x",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bench_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The benchmark's tiny shape: hidden 64, 2 layers, 4 heads, 2 kv heads."""
    return build_tiny_model(
        tmp_path_factory.mktemp("fast") / "tiny64", seed=1, hidden_size=64, num_layers=2,
        num_heads=4, num_kv_heads=2, intermediate_size=128,
    )


def random_lora_policy(path: Path, dtype: str = "float32") -> tuple[Any, Any]:
    """(peft model with a random, non-zero LoRA in eval mode, tokenizer) of the model at `path`."""
    tok = load_tokenizer(str(path))
    base = load_base_model(ModelConfig(name_or_path=str(path), build_tiny_if_missing=False, device="cpu", dtype=dtype))
    model = attach_lora(base, LoraConfig(r=8, alpha=32, dropout=0.1), seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.eval()
    return model, tok


@pytest.fixture(scope="module", params=["bench_tiny", "project_tiny"])
def policy(request: pytest.FixtureRequest, bench_tiny_dir: Path, tiny_model_dir: Path) -> tuple[Any, Any]:
    """(peft model with a random, non-zero LoRA in eval mode, tokenizer)."""
    return random_lora_policy(bench_tiny_dir if request.param == "bench_tiny" else tiny_model_dir)


@pytest.fixture(params=[True, False], ids=["native", "torch"])
def native(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Each test twice: with the native kernels (skipped where they do not build) and with the
    fast path's torch operators (`kernels()` returning None)."""
    if not request.param:
        monkeypatch.setattr(fastpath_module, "kernels", lambda: None)
    elif kernels() is None:
        pytest.skip("the native kernels do not build here")
    return request.param


def batch(tok: Any, group: int = 3, t: int = 9, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Left-padded prompts of different lengths, `group` rows each, random completions whose
    masks end at random lengths (right-padded with the pad id after the last kept token)."""
    enc = tok(PROMPTS, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
    rows = torch.arange(len(PROMPTS)).repeat_interleave(group)  # (N,)
    prompt_ids, prompt_mask = enc["input_ids"][rows], enc["attention_mask"][rows]  # (N, P)
    gen = torch.Generator().manual_seed(seed)
    n = rows.numel()
    completion_ids = torch.randint(0, len(tok), (n, t), generator=gen)  # (N, T)
    lengths = torch.randint(1, t + 1, (n,), generator=gen)  # (N,)
    lengths[0] = t
    completion_mask = (torch.arange(t)[None, :] < lengths[:, None]).long()  # (N, T)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tok.pad_token_id)
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def unpadded_logprobs(model: Any, prompt_ids, prompt_mask, completion_ids, completion_mask) -> list[torch.Tensor]:
    """Independent reference: each row alone, without padding, full log_softmax."""
    out = []
    with torch.no_grad():
        for p, pm, c, cm in zip(prompt_ids, prompt_mask, completion_ids, completion_mask):
            real_p, real_c = p[pm.bool()], c[cm.bool()]
            ids = torch.cat([real_p, real_c])[None]  # (1, L)
            logits = model(input_ids=ids).logits[0, len(real_p) - 1 : -1]  # (Tc, V)
            out.append(logits.log_softmax(-1).gather(-1, real_c[:, None])[:, 0])  # (Tc,)
    return out


# --------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("share_prompts", [True, False])
def test_logprobs_match_plain_path(policy, share_prompts: bool) -> None:
    model, tok = policy
    args = batch(tok)
    mask = args[3].bool()
    with torch.no_grad():
        plain = completion_logprobs(model, *args)  # (N, T)
        fast = completion_logprobs_fast(model, *args, share_prompts=share_prompts)
        with model.disable_adapter():
            plain_ref = completion_logprobs(model, *args)
            fast_ctx = completion_logprobs_fast(model, *args, share_prompts=share_prompts)
        fast_ref = completion_logprobs_fast(model, *args, use_adapter=False, share_prompts=share_prompts)
        fast_mb = completion_logprobs_fast(model, *args, micro_batch_size=4, share_prompts=share_prompts)
    assert fast.shape == plain.shape == args[2].shape
    torch.testing.assert_close(fast[mask], plain[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(fast_ref[mask], plain_ref[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(fast_ctx[mask], plain_ref[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(fast_mb[mask], plain[mask], atol=1e-5, rtol=0)
    assert torch.isfinite(fast).all() and torch.isfinite(fast_ref).all()
    assert (fast[mask] - fast_ref[mask]).abs().max() > 1e-2  # the adapter matters
    # independent of the plain batched path: each row alone, unpadded
    for row, want in enumerate(unpadded_logprobs(model, *args)):
        torch.testing.assert_close(fast[row][mask[row]], want, atol=1e-5, rtol=0)


def test_rows_in_any_order(policy) -> None:
    """Prompt sharing finds equal prompts wherever their rows are."""
    model, tok = policy
    args = batch(tok)
    perm = torch.randperm(args[0].shape[0], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = completion_logprobs_fast(model, *args)
        shuffled = completion_logprobs_fast(model, *(a[perm] for a in args))
    torch.testing.assert_close(shuffled, whole[perm], atol=1e-5, rtol=0)


@pytest.mark.skipif(
    not onednn_linear_available(torch.device("cpu"), torch.float32), reason="no oneDNN linear op here"
)
def test_onednn_and_default_gemms_agree(policy) -> None:
    """The log-prob pass with the base GEMMs through oneDNN and through torch's own."""
    model, tok = policy
    args = batch(tok)
    fast = FastQwen2(model)
    with torch.no_grad():
        on = completion_logprobs_fast(fast, *args)
        fast.dnn = False
        off = completion_logprobs_fast(fast, *args)
    torch.testing.assert_close(on, off, atol=1e-5, rtol=0)


@pytest.mark.skipif(
    not onednn_packing_available(torch.device("cpu"), torch.float32), reason="no oneDNN weight packing here"
)
def test_packed_weights_change_no_result(policy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Frozen base weights packed for oneDNN: the same log-probs, LoRA gradients and sampled
    tokens as the unpacked weights."""
    model, tok = policy
    args = batch(tok)
    runs = []
    for pack in (True, False):
        if not pack:
            monkeypatch.setattr("grpo.engines.cpu_fast.qwen2.onednn_packing_available", lambda *a: False)
        fast = FastQwen2(model)
        assert fast.pack is pack and bool(fast.layers[0].wp) is pack
        logp = completion_logprobs_fast(fast, *args)
        logp.sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        ids, lengths, _ = fast.generate(
            args[0][::3], args[1][::3], 100, max_new_tokens=6, generator=torch.Generator().manual_seed(1)
        )
        runs.append((logp.detach(), grads, ids, lengths))
    (logp, grads, ids, lengths), (logp0, grads0, ids0, lengths0) = runs
    torch.testing.assert_close(logp, logp0, atol=1e-6, rtol=1e-6)
    for g, g0 in zip(grads, grads0):
        torch.testing.assert_close(g, g0, atol=1e-6, rtol=1e-5)
    assert torch.equal(ids, ids0) and torch.equal(lengths, lengths0)

def test_temperature_and_single_token(policy) -> None:
    model, tok = policy
    args = batch(tok, t=1)
    with torch.no_grad():
        for temp in (1.0, 0.7):
            plain = completion_logprobs(model, *args, temperature=temp)
            fast = completion_logprobs_fast(model, *args, temperature=temp)
            torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("share_prompts", [True, False])
@pytest.mark.parametrize(("loss_type", "level"), [
    ("grpo", "token"), ("bnpo", "token"), ("dr_grpo", "token"), ("dapo", "token"), ("cispo", "token"),
    ("grpo", "sequence"), ("dapo", "sequence"), ("cispo", "sequence"),
])
def test_loss_and_gradients_match_plain_path(policy, share_prompts: bool, loss_type: str, level: str) -> None:
    """Same loss and same LoRA gradients through grpo_loss, for every loss type and both
    importance-sampling levels."""
    model, tok = policy
    args = batch(tok, seed=1)
    mask = args[3]
    n = mask.shape[0]
    adv = torch.randn(n, generator=torch.Generator().manual_seed(2))  # (N,)
    lora = {k: p for k, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in k for k in lora)

    def loss_and_grads(fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            ref = fn(model, *args, adapter=False)  # (N, T)
        logp = fn(model, *args, adapter=True)  # (N, T)
        # a ratio != 1 and a KL != 0 so every term of the loss carries gradient
        old = (logp.detach() + 0.05 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(3)))
        loss, _ = grpo_loss(
            logp, old, ref, adv, mask, epsilon_low=0.2, epsilon_high=0.28, beta=0.04,
            loss_type=loss_type, max_new_tokens=mask.shape[1], num_tokens=float(mask.sum()),
            importance_sampling_level=level,
        )
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in lora.items()}

    def plain(m, *a, adapter):
        if adapter:
            return completion_logprobs(m, *a)
        with m.disable_adapter():
            return completion_logprobs(m, *a)

    def fast(m, *a, adapter):
        return completion_logprobs_fast(m, *a, use_adapter=adapter, share_prompts=share_prompts)

    base = {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
    loss_p, grads_p = loss_and_grads(plain)
    loss_f, grads_f = loss_and_grads(fast)
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(loss_f, loss_p, atol=1e-6, rtol=1e-5)
    assert sum(g.abs().sum() for g in grads_p.values()) > 0
    for k in grads_p:
        err = float((grads_f[k] - grads_p[k]).abs().max())
        scale = float(grads_p[k].abs().max())
        assert err <= 1e-6 + 1e-4 * scale, f"{k}: max |diff| {err:.3g} vs max |grad| {scale:.3g}"
    for k, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None and torch.equal(p, base[k]), k


def test_bfloat16_base_with_float32_adapter(tiny_model_dir: Path) -> None:
    """A bfloat16 base with peft's float32 adapter: the LoRA branch runs in float32 and is added
    as peft adds it, then cast. Log-probs and LoRA gradients agree with the plain path within
    bfloat16 rounding (about 0.03 on log-probs of magnitude 6, a few % on gradients)."""
    model, tok = random_lora_policy(tiny_model_dir, dtype="bfloat16")
    lora = {k: p for k, p in model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in lora.values()} == {torch.float32} and supports(model)
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    args = batch(tok)
    mask = args[3].bool()

    def logp_and_grads(fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        logp = fn(model, *args)  # (N, T)
        (logp * mask).sum().backward()
        return logp.detach().float(), {k: p.grad.clone() for k, p in lora.items()}

    plain, plain_grads = logp_and_grads(completion_logprobs)
    fast, fast_grads = logp_and_grads(completion_logprobs_fast)
    assert float((fast - plain)[mask].abs().max()) < 0.06
    for k, want in plain_grads.items():
        err = float((fast_grads[k] - want).abs().max()) / float(want.abs().max())
        assert err < 0.2, f"{k}: max |diff| / max |grad| = {err:.3f}"


def test_entropy_matches_the_plain_path(policy) -> None:
    """The fast head's entropy (no gradient) equals the plain path's, from the same pass as the
    log-probs, with and without gradients."""
    model, tok = policy
    args = batch(tok, seed=4)
    mask = args[3].bool()
    for temp in (1.0, 0.7):
        with torch.no_grad():
            p_logp, p_ent = completion_logprobs(model, *args, temperature=temp, with_entropy=True)
            f_logp, f_ent = completion_logprobs_fast(model, *args, temperature=temp, with_entropy=True)
        torch.testing.assert_close(f_logp[mask], p_logp[mask], atol=1e-5, rtol=0)
        torch.testing.assert_close(f_ent[mask], p_ent[mask], atol=1e-4, rtol=0)
        assert bool((p_ent[mask] > 0).all())
    logp, ent = completion_logprobs_fast(model, *args, with_entropy=True)
    assert logp.requires_grad and not ent.requires_grad


def test_selective_head_matches_log_softmax() -> None:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 700, 16, generator=gen, requires_grad=True)  # (n, T, H): several chunks
    w = torch.randn(500, 16, generator=gen, requires_grad=True)  # (V, H)
    target = torch.randint(0, 500, (3, 700), generator=gen)
    g = torch.randn(3, 700, generator=gen)
    for temp, dnn in ((1.0, False), (0.5, False), (0.7, onednn_linear_available(h.device, h.dtype))):
        got = selective_head_logprobs(h, w, target, temp, dnn=dnn)
        got.backward(g)
        gh, gw = h.grad.clone(), w.grad.clone()
        h.grad = w.grad = None
        want = ((h @ w.t()) / temp).log_softmax(-1).gather(-1, target[..., None])[..., 0]
        want.backward(g)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(gh, h.grad, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(gw, w.grad, atol=1e-4, rtol=1e-5)
        h.grad = w.grad = None


def test_lora_dropout_in_training_mode(policy) -> None:
    """Training mode applies peft's dropout p (different draws per call, unbiased on average);
    eval mode none; the reference pass never sees the adapter."""
    model, tok = policy
    args = batch(tok, group=1, t=4)
    mask = args[3].bool()
    fast = FastQwen2(model)
    with torch.no_grad():
        eval_logp = completion_logprobs_fast(fast, *args)
        model.train()
        try:
            torch.manual_seed(0)
            a = completion_logprobs_fast(fast, *args)
            b = completion_logprobs_fast(fast, *args)
            ref = completion_logprobs_fast(fast, *args, use_adapter=False)
            lay = fast.layers[0]
            x = torch.randn(4000, lay.w["q_proj"].shape[1])
            mean = torch.stack([fast._proj(x, lay, "q_proj", True) for _ in range(30)]).mean(0)
        finally:
            model.eval()
        eval_ref = completion_logprobs_fast(fast, *args, use_adapter=False)
        want = fast._proj(x, lay, "q_proj", True)
    assert not torch.allclose(a[mask], b[mask]) and not torch.allclose(a[mask], eval_logp[mask])
    torch.testing.assert_close(ref, eval_ref)
    # E[dropout(x) / (1 - p)] = x: the mean over draws approaches the eval output
    base_out = fast._proj(x, lay, "q_proj", False)
    err = (mean - want).abs().mean() / (want - base_out).abs().mean()
    assert err < 0.1


@pytest.mark.parametrize("dnn", [True, False])
@pytest.mark.parametrize("p", [0.1, 0.4])
def test_sparse_lora_dropout_equals_the_keep_mask(policy, dnn: bool, p: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU the LoRA dropout (p <= 0.25) zeroes the drawn positions of x and of its gradient in
    place of a keep-mask multiply; above that, and off the CPU, it multiplies by a keep mask.
    Either way: the same output and gradients as the mask of the same draws (through oneDNN
    where it runs, and through torch's own GEMMs)."""
    model, _ = policy
    fast = FastQwen2(model)
    fast.dnn = fast.dnn and dnn
    lay = fast.layers[1]
    mod = lay.lora["gate_proj"]
    a, b = mod.lora_A[fast.adapter].weight, mod.lora_B[fast.adapter].weight  # (r, in), (out, r)
    monkeypatch.setattr(mod.lora_dropout[fast.adapter], "p", p)
    scale = mod.scaling[fast.adapter]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, a.shape[1], generator=gen, requires_grad=True)
    g = torch.randn(3, 40, b.shape[0], generator=gen)
    model.train()
    try:
        torch.manual_seed(5)
        got = fast._proj(x, lay, "gate_proj", True)
    finally:
        model.eval()
    got.backward(g)
    grads = [t.grad.clone() for t in (x, a, b)]
    for t in (x, a, b):
        t.grad = None
    torch.manual_seed(5)
    keep = dropout_keep(tuple(x.shape), p, x.dtype, x.device)
    assert 0 < (keep == 0).sum() < keep.numel()
    # the keep mask of the same draws, in float64: float32 sums over 120 rows round differently,
    # so each result must be within 1e-5 of its own largest entry
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    w64 = lay.w["gate_proj"].double()
    want = F.linear(x64, w64) + F.linear(F.linear(x64 * keep.double(), a64), b64) * (scale / (1 - p))
    want.backward(g.double())
    for have, ref in zip((got.detach(), *grads), (want.detach(), x64.grad, a64.grad, b64.grad)):
        err = float((have.double() - ref).abs().max())
        assert err <= 1e-5 * float(ref.abs().max()), f"max |diff| {err:.3g} vs max |ref| {float(ref.abs().max()):.3g}"


def test_grouped_projections_dropout_equals_the_keep_masks(
    policy, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """q/k/v share one input and draw one dropout mask each (in that order). With the native
    kernels the group runs one x A^T product and corrects it at each projection's dropped entries
    (forward and backward); without them each projection zeroes its own copy of x. Both: the
    output and gradients of the three keep masks of the same draws, in float64."""
    model, _ = policy
    fast = FastQwen2(model)
    lay = fast.layers[1]
    names = ("q_proj", "k_proj", "v_proj")
    mods = [lay.lora[n] for n in names]
    ab = [(m.lora_A[fast.adapter].weight, m.lora_B[fast.adapter].weight) for m in mods]  # (r, in), (out, r)
    p = 0.1
    for m in mods:
        monkeypatch.setattr(m.lora_dropout[fast.adapter], "p", p)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, ab[0][0].shape[1], generator=gen, requires_grad=True)
    gs = [torch.randn(3, 40, b.shape[0], generator=gen) for _, b in ab]
    model.train()
    try:
        torch.manual_seed(7)
        outs = fast._project(x, lay, names, True)
    finally:
        model.eval()
    torch.autograd.backward(outs, gs)
    params = [x] + [t for pair in ab for t in pair]
    grads = [t.grad.clone() for t in params]
    for t in params:
        t.grad = None
    torch.manual_seed(7)
    keeps = [dropout_keep(tuple(x.shape), p, x.dtype, x.device).double() for _ in names]
    x64 = x.detach().double().requires_grad_()
    ab64 = [(a.detach().double().requires_grad_(), b.detach().double().requires_grad_()) for a, b in ab]
    wants = []
    for name, m, keep, (a64, b64) in zip(names, mods, keeps, ab64):
        scale = m.scaling[fast.adapter] / (1 - p)
        base = F.linear(x64, lay.w[name].double(), lay.b[name].double() if name in lay.b else None)
        wants.append(base + F.linear(F.linear(x64 * keep, a64), b64) * scale)
    torch.autograd.backward(wants, [g.double() for g in gs])
    got_all = [o.detach() for o in outs] + grads
    want_all = [w.detach() for w in wants] + [x64.grad] + [t.grad for pair in ab64 for t in pair]
    for have, ref in zip(got_all, want_all):
        err = float((have.double() - ref).abs().max())
        assert err <= 1e-5 * float(ref.abs().max()), f"max |diff| {err:.3g} vs max |ref| {float(ref.abs().max()):.3g}"


# --------------------------------------------------------------------------- sampling


def test_merged_generation_weights(policy) -> None:
    model, tok = policy
    base = {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
    fast = FastQwen2(model)
    ids, mask, _, _ = batch(tok, group=1)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        got = fast.logits(fast.hidden_states(ids, mask, merged=True))
        real = mask.bool()
        # merging W + (B @ A) * s rounds differently from adding the adapter's output
        torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)
        # a changed adapter reaches the generation weights at the next sync, not before
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.add_(0.1)
        stale = fast.logits(fast.hidden_states(ids, mask, merged=True))
        fast.sync(model)
        fresh = fast.logits(fast.hidden_states(ids, mask, merged=True))
        want2 = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.sub_(0.1)
    torch.testing.assert_close(stale[real], want[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fresh[real], want2[real], atol=1e-4, rtol=1e-4)
    assert (want2[real] - want[real]).abs().max() > 1e-2  # the change was visible
    for k, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base[k]), f"{k} changed"


def test_base_weights_bit_identical_after_sync_and_generate(policy) -> None:
    model, tok = policy
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    gen = CpuFastEngine(model, tok, GenerationConfig(max_new_tokens=6))
    gen.generate(PROMPTS, 2, generator=torch.Generator().manual_seed(0))
    gen.sync(model)
    for k, p in model.named_parameters():
        assert torch.equal(p, before[k]), k


def gen_pair(policy, **cfg: Any) -> tuple[HFEngine, CpuFastEngine]:
    model, tok = policy
    stops = cfg.pop("stop_ids", None)
    gc = GenerationConfig(**{"max_new_tokens": 16, **cfg})
    return (
        HFEngine(model, tok, gc, stop_ids=stops),
        CpuFastEngine(model, tok, gc, stop_ids=stops),
    )


def assert_same_rollout(a, b) -> None:
    for field in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.texts == b.texts


def test_greedy_tokens_identical(policy) -> None:
    hf, fast = gen_pair(policy)
    a = hf.generate(PROMPTS, 2, greedy=True, max_new_tokens=20)
    b = fast.generate(PROMPTS, 2, greedy=True, max_new_tokens=20)
    assert_same_rollout(a, b)
    assert len(set(a.completion_ids[0].tolist())) > 3  # not a degenerate model
    # duplicate prompts in the list keep their own rows
    dup = PROMPTS + PROMPTS[:1]
    assert_same_rollout(hf.generate(dup, 2, greedy=True), fast.generate(dup, 2, greedy=True))


def test_stops_min_tokens_and_early_exit_identical(policy) -> None:
    model, tok = policy
    probe = HFEngine(model, tok, GenerationConfig(max_new_tokens=12)).generate(
        PROMPTS, 1, greedy=True
    )
    # stop ids the model does emit, so rows stop at different steps (and all stop: early exit)
    stops = sorted(set(probe.completion_ids[:, [2, 5, 7]].flatten().tolist()) | set(stop_token_ids(tok)))
    hf, fast = gen_pair(policy, stop_ids=stops)
    for kw in ({}, {"min_new_tokens": 4}):
        a = hf.generate(PROMPTS, 2, greedy=True, max_new_tokens=12, **kw)
        b = fast.generate(PROMPTS, 2, greedy=True, max_new_tokens=12, **kw)
        assert_same_rollout(a, b)
        if not kw:
            assert (~a.truncated).all() and a.completion_ids.shape[1] < 12  # every row stopped early
    for seed in range(3):
        a = hf.generate(PROMPTS, 4, max_new_tokens=12, min_new_tokens=3, generator=torch.Generator().manual_seed(seed))
        rng = torch.Generator().manual_seed(seed)
        b = fast.generate(PROMPTS, 4, max_new_tokens=12, min_new_tokens=3, generator=rng)
        assert_same_rollout(a, b)


@pytest.mark.parametrize("cfg", [{}, {"temperature": 0.7, "top_k": 20}, {"top_p": 0.9}])
def test_sampled_tokens_identical_with_same_generator(policy, cfg: dict[str, Any]) -> None:
    hf, fast = gen_pair(policy, **cfg)
    for seed in (0, 1):
        a = hf.generate(PROMPTS, 4, generator=torch.Generator().manual_seed(seed))
        b = fast.generate(PROMPTS, 4, generator=torch.Generator().manual_seed(seed))
        assert_same_rollout(a, b)
    assert len({tuple(x) for x in a.completion_ids[:4].tolist()}) > 1  # samples within a group differ


def test_inverse_cdf_sampler_draws_the_distribution() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0])  # (V,)
    rows = logits.expand(40000, 6).clone()  # (N, V)
    draws = pick_tokens(rows, False, torch.Generator().manual_seed(0), 1.0, sampler="inverse_cdf")
    again = pick_tokens(rows, False, torch.Generator().manual_seed(0), 1.0, sampler="inverse_cdf")
    assert torch.equal(draws, again)
    freq = torch.bincount(draws, minlength=6).double() / draws.numel()
    torch.testing.assert_close(freq, logits.double().softmax(0), atol=0.01, rtol=0)
    # filtered tokens are never drawn; temperature sharpens
    top2 = pick_tokens(rows, False, torch.Generator().manual_seed(1), 0.5, top_k=2, sampler="inverse_cdf")
    assert set(top2.tolist()) == {0, 1}
    share = float((top2 == 0).double().mean())
    assert abs(share - torch.tensor([4.0, 2.0]).softmax(0)[0].item()) < 0.01
    with pytest.raises(ValueError, match="sampler"):
        pick_tokens(rows, False, None, 1.0, sampler="nope")


def test_inverse_cdf_generation_runs(policy) -> None:
    model, tok = policy
    gen = CpuFastEngine(model, tok, GenerationConfig(max_new_tokens=8), sampler="inverse_cdf")
    a = gen.generate(PROMPTS, 3, generator=torch.Generator().manual_seed(0))
    b = gen.generate(PROMPTS, 3, generator=torch.Generator().manual_seed(0))
    assert_same_rollout(a, b)
    assert a.completion_ids.shape == (9, 8) and len({tuple(x) for x in a.completion_ids.tolist()}) > 3


# --------------------------------------------------------------------------- support


def _tiny_config_model(kind: str) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    if kind == "llama":
        return LlamaForCausalLM(
            LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)
        )
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    if kind == "qwen2-rope-linear":
        cfg.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    return Qwen2ForCausalLM(cfg)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2-rope-linear"])
def test_unsupported_models_fall_back(kind: str) -> None:
    model = _tiny_config_model(kind)
    assert not supports(model) and unsupported_reason(model)
    with pytest.raises(ValueError, match="Hugging Face path"):
        FastQwen2(model)
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="Hugging Face path"):
        completion_logprobs_fast(model, ids, ids, ids, ids)


class _V4Config:
    """A transformers-4-style view of a v5 config: `rope_theta` / `rope_scaling` instead of
    `rope_parameters`, every other attribute read through."""

    def __init__(self, cfg: Any, rope_theta: float | None, rope_scaling: dict[str, Any] | None) -> None:
        self._cfg, self.rope_theta, self.rope_scaling = cfg, rope_theta, rope_scaling

    def __getattr__(self, name: str) -> Any:
        if name in ("rope_parameters", "_cfg"):
            raise AttributeError(name)
        return getattr(self._cfg, name)


@pytest.mark.parametrize(
    "v5, v4",
    [
        ({"rope_type": "default", "rope_theta": 10000.0}, {"rope_theta": 10000.0, "rope_scaling": None}),
        ({"rope_type": "default", "rope_theta": 1e6}, {"rope_theta": 1e6, "rope_scaling": {"rope_type": "default"}}),
        ({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
         {"rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}}),
        ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4},
         {"rope_theta": 1e4, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
    ],
)
def test_rope_parameters_read_v4_and_v5_configs(v5: dict[str, Any], v4: dict[str, Any]) -> None:
    from types import SimpleNamespace

    assert rope_parameters(SimpleNamespace(rope_parameters=v5)) == v5
    assert rope_parameters(SimpleNamespace(**v4)) == v5
    assert rope_parameters(SimpleNamespace(rope_parameters=None)) == {}


def test_v4_style_config_takes_the_fast_path() -> None:
    model = _tiny_config_model("qwen2")
    rope = rope_parameters(model.config)  # the installed transformers' own layout
    assert rope["rope_type"] == "default"
    theta = float(rope["rope_theta"])
    model.config = _V4Config(model.config, theta, None)
    assert unsupported_reason(model) is None
    assert FastQwen2(model).rope_theta == theta
    model.config = _V4Config(model.config._cfg, theta, {"type": "linear", "factor": 2.0})
    assert "not the default rope" in (unsupported_reason(model) or "")


def test_supported_and_unsupported_adapters() -> None:
    import peft

    plain = _tiny_config_model("qwen2")
    assert supports(plain), unsupported_reason(plain)
    lora = peft.get_peft_model(
        _tiny_config_model("qwen2"), peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"])
    )
    assert supports(lora), unsupported_reason(lora)
    dora = peft.get_peft_model(
        _tiny_config_model("qwen2"), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    )
    assert not supports(dora)
    head = peft.get_peft_model(_tiny_config_model("qwen2"), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert not supports(head)
    saved = peft.get_peft_model(
        _tiny_config_model("qwen2"), peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    assert not supports(saved)
    merged = peft.get_peft_model(_tiny_config_model("qwen2"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    merged.merge_adapter()
    assert not supports(merged)


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5])
def test_dropout_keep_is_independent_bernoulli(p: float, native: bool) -> None:
    """Drop rate p, no correlation between neighbours (drawn pairs ~ p^2), a fixed stream under
    torch.manual_seed, with the native positions and with torch's; p=0.5 takes the rand >= p
    branch."""
    n = 400_000
    torch.manual_seed(3)
    keep = dropout_keep((400, 1000), p, torch.float32, torch.device("cpu"))
    assert keep.shape == (400, 1000) and set(keep.unique().tolist()) <= {0.0, 1.0}
    drop = 1.0 - keep.reshape(-1)
    se = (p * (1 - p) / n) ** 0.5
    assert abs(drop.mean().item() - p) < 5 * se
    pairs = (drop[1:] * drop[:-1]).mean().item()  # both of two neighbours dropped
    assert abs(pairs - p * p) < 5 * (p * p * (1 - p * p) / n) ** 0.5
    torch.manual_seed(3)
    again = dropout_keep((400, 1000), p, torch.float32, torch.device("cpu"))
    assert torch.equal(keep, again)
    assert not torch.equal(keep, dropout_keep((400, 1000), p, torch.float32, torch.device("cpu")))


@pytest.mark.parametrize("p", [0.05, 0.01])
def test_dropped_positions_gaps_are_geometric(p: float, native: bool) -> None:
    """The gaps between dropped positions follow Geometric(p) (a chi-square over the first
    bins and the tail) and do not depend on the gap before; positions ascend, stay below n,
    with the native generator and torch's."""
    n = 4_000_000
    torch.manual_seed(11)
    drops = dropped_positions(n, p, torch.device("cpu"))
    assert drops.dtype == torch.int64 and bool((drops[1:] > drops[:-1]).all())
    assert 0 <= int(drops[0]) and int(drops[-1]) < n
    gaps = torch.diff(drops).double()  # (k - 1,)
    k = gaps.numel()
    bins = 40 if p == 0.05 else 150  # P(gap > bins) is about a tenth
    counts = torch.bincount(gaps.long().clamp(max=bins + 1), minlength=bins + 2)[1:].double()  # gaps 1..bins, tail
    probs = torch.tensor([p * (1 - p) ** (g - 1) for g in range(1, bins + 1)] + [(1 - p) ** bins], dtype=torch.float64)
    chi2 = float(((counts - k * probs) ** 2 / (k * probs)).sum())
    assert chi2 < bins + 6 * (2 * bins) ** 0.5, f"chi-square {chi2:.1f} over {bins + 1} bins"
    centred = gaps - gaps.mean()
    lag1 = float((centred[1:] * centred[:-1]).mean() / (centred * centred).mean())
    assert abs(lag1) < 5 / k**0.5


def test_torch_dropped_positions_reads_one_stream_in_batches() -> None:
    """Batches of gaps read the same sequence of draws as one batch: the same positions."""
    torch.manual_seed(3)
    one = torch_dropped_positions(100_000, 0.05, torch.device("cpu"))
    torch.manual_seed(3)
    batched = torch_dropped_positions(100_000, 0.05, torch.device("cpu"), gaps_per_draw=7)
    assert torch.equal(one, batched)


def test_keep_freed_memory_is_idempotent() -> None:
    import platform

    first = keep_freed_memory()
    assert keep_freed_memory() == first
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert first is True
