"""The native CPU kernels (`grpo.engines.cpu_fast.native`) against torch's operators, and the fast path with and
without them.

Run: `pytest -q tests/test_native.py`. The kernels are built with the machine's C compiler on
first use (cached); where there is none, the kernel tests skip and the fallback test still runs.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_fastpath import random_lora_policy  # tests/ is on sys.path under pytest

import grpo.engines.cpu_fast.native as native_module
import grpo.engines.cpu_fast.qwen2 as fastpath
from grpo.config import GenerationConfig
from grpo.engines.cpu_fast import CpuFastEngine
from grpo.engines.cpu_fast.native import NativeKernels, build, kernels, reference_decode_attention
from grpo.models import build_tiny_model

CC = shutil.which("cc") or shutil.which("gcc")
HAVE_CC = CC is not None


@pytest.fixture
def native() -> NativeKernels:
    if not HAVE_CC:
        pytest.skip("no C compiler on this machine: the native kernels cannot be built")
    loaded = kernels()
    assert loaded is not None, "a C compiler is here, so the kernels must build and pass their self-check"
    return loaded


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("hq, hkv, d", [(4, 2, 64), (14, 2, 64), (4, 4, 128), (6, 2, 24)])
def test_decode_attention_matches_torch(native: NativeKernels, threads: int, hq: int, hkv: int, d: int) -> None:
    """Rows read their prompt's keys/values (3 prompts, rows out of order, left padding) and
    their own generated slots, one of which each step writes."""
    g = torch.Generator().manual_seed(hq * d)
    n, u, plen, span = 7, 3, 6, 30
    qkv, bias = torch.randn(n, (hq + 2 * hkv) * d, generator=g), torch.randn((hq + 2 * hkv) * d, generator=g)
    cos, sin = torch.rand(n, d, generator=g), torch.rand(n, d, generator=g) - 0.5
    pk, pv = torch.randn(u, hkv, plen, d, generator=g), torch.randn(u, hkv, plen, d, generator=g)
    pmask = torch.zeros(u, plen)
    pmask[0, :5] = float("-inf")  # left padding of two prompts
    pmask[2, :1] = float("-inf")
    prompt_of = torch.tensor([0, 0, 2, 1, 2, 0, 1])
    kc, vc = torch.randn(n, hkv, span, d, generator=g), torch.randn(n, hkv, span, d, generator=g)
    for slot in (0, 17, span - 1):
        k_ref, v_ref = kc.clone(), vc.clone()
        want = reference_decode_attention(
            qkv + bias, cos, sin, pk, pv, pmask, prompt_of, k_ref, v_ref, hq, slot, d**-0.5
        )
        out = native.decode_attention(
            qkv, bias, cos, sin, pk, pv, pmask, prompt_of, kc, vc, torch.empty(n, hq * d), slot, d**-0.5
        )
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kc, k_ref, rtol=1e-6, atol=1e-6)  # the slot written, the rest kept
        assert torch.equal(vc, v_ref)
    out = torch.empty(n, hq * d)
    with pytest.raises(ValueError, match="shapes"):
        native.decode_attention(qkv[:, :-1], bias, cos, sin, pk, pv, pmask, prompt_of, kc, vc, out, 3, 1.0)
    with pytest.raises(ValueError, match="shapes"):
        native.decode_attention(qkv, bias, cos[:-1], sin, pk, pv, pmask, prompt_of, kc, vc, out, 3, 1.0)
    with pytest.raises(ValueError, match="shapes"):
        native.decode_attention(qkv, bias, cos, sin, pk[:, :, :-1], pv, pmask, prompt_of, kc, vc, out, 3, 1.0)
    with pytest.raises(ValueError, match="shapes"):
        native.decode_attention(qkv, bias[:-1], cos, sin, pk, pv, pmask, prompt_of, kc, vc, out, 3, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        strided = kc.transpose(2, 3).contiguous().transpose(2, 3)
        native.decode_attention(qkv, bias, cos, sin, pk, pv, pmask, prompt_of, strided, vc, out, 3, 1.0)
    with pytest.raises(ValueError, match="outside 0..2"):
        native.decode_attention(qkv, bias, cos, sin, pk, pv, pmask, prompt_of + 1, kc, vc, out, 3, 1.0)
    with pytest.raises(ValueError, match="int64"):
        native.decode_attention(qkv, bias, cos, sin, pk, pv, pmask, prompt_of.int(), kc, vc, out, 3, 1.0)


@pytest.mark.parametrize(
    "hq, hkv, d, length, prefix, shared",
    [(4, 2, 64, 23, 9, False), (4, 2, 64, 23, 9, True), (14, 2, 64, 6, 0, False), (4, 4, 128, 17, 3, True),
     (6, 2, 16, 33, 0, False)],
)  # fmt: skip
def test_attention_matches_torch(
    native: NativeKernels, threads: int, hq: int, hkv: int, d: int, length: int, prefix: int, shared: bool
) -> None:
    """Forward and gradients against torch's fused attention: causal over a prefix of keys, left
    padding in the prefix, padded keys at the end, q and the prompt keys as strided views (the
    layout the rotary kernel writes), GQA rep 1 to 7, L not a multiple of 4, a key span not a
    multiple of 16. `shared`: the prefix keys/values are those of 2 prompts that the 5 rows
    read (out of order), their gradients summed over each prompt's rows."""
    g = torch.Generator().manual_seed(hq * d + length)
    n, span = 5, prefix + length
    q = torch.randn(n, length, hq, d, generator=g).transpose(1, 2).requires_grad_()  # (n, Hq, L, D) strided
    k = torch.randn(n, hkv, length, d, generator=g, requires_grad=True)
    v = torch.randn(n, hkv, length, d, generator=g, requires_grad=True)
    rows = torch.tensor([1, 0, 1, 1, 0])
    units = 2 if shared else n
    pk = torch.randn(units, prefix, hkv, d, generator=g).transpose(1, 2).requires_grad_()  # (U, Hkv, P, D) strided
    pv = torch.randn(units, hkv, prefix, d, generator=g, requires_grad=True)
    pick = rows if shared else torch.arange(n)
    allowed = torch.ones(length, span, dtype=torch.bool).tril(prefix)[None].repeat(n, 1, 1)  # (n, L, S)
    if prefix:
        allowed[0, :, :2] = False  # left padding of the prefix
    allowed[1, :, span - 2 :] = False  # padding after a stop
    allowed[1, -2:, span - 3] = True  # the padded queries see one key
    mask = torch.zeros(n, 1, length, span).masked_fill(~allowed[:, None], float("-inf"))
    keys, values = torch.cat([pk[pick], k], dim=2), torch.cat([pv[pick], v], dim=2)  # (n, Hkv, S, D)
    want = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=hq != hkv)
    grad = torch.randn(n, length, hq, d, generator=g).transpose(1, 2)
    want_grads = torch.autograd.grad(want, (q, k, v, pk, pv), grad)
    detached = [t.detach() for t in (q, k, v, pk, pv)]
    if shared:
        args = dict(prefix=(detached[3], detached[4], rows))
    else:  # the whole span as the rows' own keys
        args = {}
        detached[1:3] = [keys.detach(), values.detach()]
    out, probs = native.attention(*detached[:3], mask, keep_probs=True, **args)
    torch.testing.assert_close(out, want.detach(), rtol=1e-5, atol=1e-5)
    assert out.transpose(1, 2).is_contiguous()  # (n, L, Hq, D): (n, L, Hq D) is a view
    none, no_probs = native.attention(*detached[:3], mask, keep_probs=False, **args)
    assert no_probs is None and torch.equal(none, out)
    dq, dk, dv, dpk, dpv = native.attention_backward(grad, probs, *detached[:3], **args)
    if shared:
        dpk = torch.zeros(2, hkv, prefix, d).index_add_(0, rows, dpk)
        dpv = torch.zeros(2, hkv, prefix, d).index_add_(0, rows, dpv)
    else:
        assert dpk is None and dpv is None
        dk, dpk = dk[:, :, prefix:], dk[:, :, :prefix]
        dv, dpv = dv[:, :, prefix:], dv[:, :, :prefix]
    for have, ref in zip((dq, dk, dv, dpk, dpv), want_grads):
        torch.testing.assert_close(have, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="16"):
        native.attention(q.detach()[..., :8], k.detach()[..., :8], v.detach()[..., :8], mask, keep_probs=False)
    with pytest.raises(ValueError, match="rotary"):  # rotary tables need as many own keys as queries
        native.attention(*detached[:3], mask, keep_probs=False, rope=(torch.ones(n, length + 1, d),) * 2, **args)
    with pytest.raises(ValueError, match="mask"):
        native.attention(*detached[:3], mask[:, :, :, :-1], keep_probs=False, **args)
    if shared:
        with pytest.raises(ValueError, match="outside the prompts"):
            native.attention(*detached[:3], mask, keep_probs=False, prefix=(detached[3], detached[4], rows + 1))


@pytest.mark.parametrize("hq, hkv, d, length, prefix", [(4, 2, 64, 23, 9), (6, 2, 16, 13, 0)])
def test_attention_rotates_q_and_k(
    native: NativeKernels, threads: int, hq: int, hkv: int, d: int, length: int, prefix: int
) -> None:
    """With rotary tables the kernels take q and the own keys unrotated and give the forward and
    the gradients of the unrotated inputs: the same as rotating first (torch's operators) and
    attending (torch's fused kernel); the prompt keys come rotated."""
    g = torch.Generator().manual_seed(d + length)
    n, span = 3, prefix + length
    q = torch.randn(n, length, hq, d, generator=g).transpose(1, 2).requires_grad_()  # (n, Hq, L, D) strided
    k = torch.randn(n, length, hkv, d, generator=g).transpose(1, 2).requires_grad_()  # (n, Hkv, L, D) strided
    v = torch.randn(n, hkv, length, d, generator=g, requires_grad=True)
    pk = torch.randn(2, hkv, prefix, d, generator=g, requires_grad=True)
    pv = torch.randn(2, hkv, prefix, d, generator=g, requires_grad=True)
    rows = torch.tensor([1, 0, 1])
    angle = torch.rand(n, length, d // 2, generator=g) * 6
    cos = torch.cat([angle.cos(), angle.cos()], dim=-1)  # (n, L, D)
    signed_sin = torch.cat([-angle.sin(), angle.sin()], dim=-1)  # (n, L, D)
    allowed = torch.ones(length, span, dtype=torch.bool).tril(prefix)[None].repeat(n, 1, 1)
    mask = torch.zeros(n, 1, length, span).masked_fill(~allowed[:, None], float("-inf"))

    def rot(x: torch.Tensor) -> torch.Tensor:  # x cos + rotate_half(x) sin
        half = d // 2
        return x * cos[:, None] + torch.cat([x[..., half:], x[..., :half]], dim=-1) * signed_sin[:, None]

    keys, values = torch.cat([pk[rows], rot(k)], dim=2), torch.cat([pv[rows], v], dim=2)
    want = F.scaled_dot_product_attention(rot(q), keys, values, attn_mask=mask, enable_gqa=hq != hkv)
    grad = torch.randn(n, hq, length, d, generator=g)
    inputs = (q, k, v, pk, pv) if prefix else (q, k, v)
    want_grads = torch.autograd.grad(want, inputs, grad)
    prefix_args = (pk.detach(), pv.detach(), rows) if prefix else None
    out, probs = native.attention(q.detach(), k.detach(), v.detach(), mask, keep_probs=True, prefix=prefix_args,
                                  rope=(cos, signed_sin))  # fmt: skip
    torch.testing.assert_close(out, want.detach(), rtol=1e-5, atol=1e-5)
    dq, dk, dv, dpk, dpv = native.attention_backward(grad, probs, q.detach(), k.detach(), v.detach(), prefix_args,
                                                     (cos, signed_sin))  # fmt: skip
    got = [dq, dk, dv]
    if prefix:
        got += [torch.zeros(2, hkv, prefix, d).index_add_(0, rows, g) for g in (dpk, dpv)]
    for have, ref in zip(got, want_grads):
        torch.testing.assert_close(have, ref, rtol=1e-4, atol=1e-5)


def test_attention_of_a_query_without_keys_is_zero(native: NativeKernels) -> None:
    """A query whose keys are all masked gets zeros (torch gives NaN there) and passes no gradient."""
    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)
    mask = torch.zeros(1, 1, 3, 4)
    mask[0, 0, 1] = float("-inf")
    out, probs = native.attention(q, k, v, mask, keep_probs=True)
    assert torch.equal(out[:, :, 1], torch.zeros(1, 2, 16)) and bool(out[:, :, 0].abs().sum() > 0)
    dq, *_ = native.attention_backward(torch.ones(1, 2, 3, 16), probs, q, k, v)
    assert torch.equal(dq[:, :, 1], torch.zeros(1, 2, 16))


def test_swiglu_matches_torch(native: NativeKernels, threads: int) -> None:
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(3, 50, 96, generator=g) * 4
    gate[0, 0, :6] = torch.tensor([0.0, -90.0, 90.0, 1e-40, -1e-3, 30.0])  # saturation, denormal, zero
    up = torch.randn(3, 50, 96, generator=g)
    torch.testing.assert_close(native.swiglu(gate, up), F.silu(gate) * up, rtol=1e-5, atol=1e-6)
    both = torch.randn(40, 2 * 96, generator=g) * 3  # the two halves of one tensor: strided rows
    a, b = both.chunk(2, dim=-1)
    torch.testing.assert_close(native.swiglu(a, b), F.silu(a) * b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="row stride"):
        native.swiglu(a, b.contiguous())

    grad = torch.randn(3, 50, 96, generator=g)
    gate_ = gate.clone().requires_grad_()
    up_ = up.clone().requires_grad_()
    (F.silu(gate_) * up_).backward(grad)
    dgate, dup = native.swiglu_backward(grad, gate, up)
    torch.testing.assert_close(dgate, gate_.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dup, up_.grad, rtol=1e-5, atol=1e-5)


def test_rms_norm_matches_torch(native: NativeKernels, threads: int) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 40, 72, generator=g) * 3
    w = torch.randn(72, generator=g)
    out, rstd = native.rms_norm(x, w, 1e-6, with_rstd=True)
    torch.testing.assert_close(out, F.rms_norm(x, (72,), w, 1e-6), rtol=1e-5, atol=1e-5)
    assert rstd is not None and rstd.shape == (5, 40, 1)
    assert native.rms_norm(x, w, 1e-6)[1] is None

    grad = torch.randn(5, 40, 72, generator=g)
    x_ = x.clone().requires_grad_()
    F.rms_norm(x_, (72,), w, 1e-6).backward(grad)
    torch.testing.assert_close(native.rms_norm_backward(grad, x, w, rstd), x_.grad, rtol=1e-4, atol=1e-5)


def test_build_is_cached_and_failures_are_one_line(tmp_path: Path) -> None:
    if not HAVE_CC:
        pytest.skip("no C compiler on this machine")
    first = build(cache_dir=tmp_path)
    assert first.exists() and build(cache_dir=tmp_path) == first  # reused, not rebuilt
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, first.name + ".sha256"]  # no leftovers
    with pytest.raises(RuntimeError, match="no C compiler found"):
        build(compiler="no-such-compiler-here", cache_dir=tmp_path)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kernels built once into a cache folder of their own (never the user's cache)."""
    if not HAVE_CC:
        pytest.skip("no C compiler on this machine")
    return build(cache_dir=tmp_path_factory.mktemp("native") / "cache")


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """GRPO_NATIVE_CACHE at a folder under tmp_path (not made yet) and `kernels()` recomputed
    for it; dropped again after the test, so later tests load from their own cache."""
    if not HAVE_CC:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("GRPO_NATIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GRPO_NATIVE", raising=False)
    kernels.cache_clear()
    yield tmp_path / "cache"
    kernels.cache_clear()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def native_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records
        if r.name == "grpo.engines.cpu_fast.native" and r.levelno >= logging.WARNING
    ]


def test_build_records_its_sha256_in_a_private_folder(built: Path) -> None:
    """The cache folder is made 0700, the library 0700 and its sidecar (0600) holds its sha256."""
    record = built.with_name(built.name + ".sha256")
    assert record.read_text() == f"{sha256(built)}  {built.name}\n"  # sha256sum's format
    assert stat.S_IMODE(built.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(built.stat().st_mode) == 0o700 and stat.S_IMODE(record.stat().st_mode) == 0o600
    assert sorted(p.name for p in built.parent.iterdir()) == [built.name, record.name]


@pytest.mark.parametrize("record", ["stale", "none"])
def test_planted_library_is_not_loaded(
    built: Path, private_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, record: str,
) -> None:  # fmt: skip
    """A library at the very path the kernels load from, whose constructor would write a marker
    file, with the genuine build's sha256 record (stale) or none: it is never loaded (the marker
    stays unwritten); the kernels are rebuilt, checked and loaded instead. Loaded elsewhere, the
    planted library does write the marker (the test's control)."""
    marker, planted = tmp_path / "planted-ran", tmp_path / "planted.so"
    source = tmp_path / "planted.c"
    source.write_text(
        "#include <stdio.h>\n"
        f'__attribute__((constructor)) static void planted(void) {{ FILE *f = fopen("{marker}", "w"); '
        "if (f) fclose(f); }\n"
    )
    subprocess.run([CC, "-shared", "-fPIC", str(source), "-o", str(planted)], check=True, capture_output=True)
    private_cache.mkdir(mode=0o700)
    target = private_cache / built.name  # where kernels() looks: the build's name is the same for any folder
    shutil.copy(planted, target)
    if record == "stale":
        shutil.copy(built.with_name(built.name + ".sha256"), private_cache)
    hashed_loads: list[str] = []
    real_cdll = ctypes.CDLL

    def cdll(name: str, *args: object, **kwargs: object) -> ctypes.CDLL:
        hashed_loads.append(sha256(Path(name)))
        return real_cdll(name, *args, **kwargs)

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    caplog.set_level(logging.INFO, logger="grpo.engines.cpu_fast.native")
    assert kernels() is not None  # rebuilt, and past its self-check
    assert not marker.exists()
    assert hashed_loads == [sha256(target)] != [sha256(planted)]  # loaded: the rebuild, which its record names
    assert target.with_name(target.name + ".sha256").read_text().split()[0] == sha256(target)
    why = "does not match its recorded sha256" if record == "stale" else "has no recorded sha256"
    assert [r.getMessage() for r in caplog.records if why in r.getMessage() and "rebuilding" in r.getMessage()]
    real_cdll(str(planted))
    assert marker.exists()


@pytest.mark.parametrize("unsafe", ["mode-0777", "other-owner", "symlink"])
def test_unsafe_cache_folder_is_refused(private_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                        unsafe: str) -> None:  # fmt: skip
    """A cache folder that others can write, that is another user's, or that is a symlink is not
    used (nothing is built or loaded there): one log line says why and the torch operators run."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    if unsafe == "mode-0777":
        private_cache.mkdir()
        private_cache.chmod(0o777)
        why = "writable by group/others (mode 0o777)"
    elif unsafe == "other-owner":
        if os.geteuid() != 0:
            pytest.skip("giving a folder to another user needs root")
        private_cache.mkdir(mode=0o700)
        os.chown(private_cache, 65534, 65534)  # nobody
        why = "owned by uid 65534"
    else:
        private_cache.symlink_to(elsewhere, target_is_directory=True)
        why = "is a symlink"
    caplog.set_level(logging.INFO, logger="grpo.engines.cpu_fast.native")
    assert kernels() is None
    (line,) = native_warnings(caplog)
    assert "using torch operators instead" in line and str(private_cache) in line and why in line
    assert list(elsewhere.iterdir()) == [] and list(private_cache.iterdir()) == []
    with pytest.raises(RuntimeError, match="refusing to load code from it"):
        build()
    g = torch.Generator().manual_seed(5)
    x, cos, sin = torch.randn(2, 3, 5, 8, generator=g), torch.rand(2, 1, 5, 8, generator=g), torch.rand(2, 1, 5, 8)
    want = x * cos + torch.cat([x[..., 4:] * sin[..., :4], x[..., :4] * sin[..., 4:]], dim=-1)
    torch.testing.assert_close(fastpath._rotary(x, cos, sin), want)  # the torch path, kernels() being None


def test_rebuild_failing_its_check_turns_kernels_off(
    private_cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A build whose bytes do not match the sha256 recorded for it is not loaded: one log line."""
    record = native_module._record
    monkeypatch.setattr(native_module, "_record", lambda dir_fd, name, _sha: record(dir_fd, name, "0" * 64))
    caplog.set_level(logging.INFO, logger="grpo.engines.cpu_fast.native")
    assert kernels() is None
    (line,) = native_warnings(caplog)
    assert "failed its check" in line and "does not match its recorded sha256" in line


def test_cpu_signature_tells_cpus_apart(tmp_path: Path) -> None:
    """-march=native builds are keyed by the CPU: on aarch64 (no "model name"/"flags") by its
    implementer, part and features, on x86 by model name and flags; clock speeds are left out."""
    arm = ("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd aes crc32 atomics\nCPU implementer\t: 0x41\n"
           "CPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n")  # fmt: skip
    x86 = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2\ncpu MHz\t\t: 2400.0\n"
    texts = [arm, arm.replace("0xd0c", "0xd40"), arm.replace("atomics", "atomics sve"), arm.replace("50.00", "48.00"),
             x86, x86.replace("2400.0", "3100.5"), x86.replace(" avx2", "")]  # fmt: skip
    signatures = []
    for i, text in enumerate(texts):
        (tmp_path / f"cpuinfo{i}").write_text(text)
        signatures.append(native_module._cpu_signature(tmp_path / f"cpuinfo{i}"))
    assert len({signatures[0], signatures[1], signatures[2]}) == 3  # another part, other features
    assert signatures[3] == signatures[0] and signatures[5] == signatures[4]  # the clock is no part of it
    assert signatures[6] != signatures[4]
    assert "CPU part\t: 0xd0c" in signatures[0] and "model name\t: Some CPU" in signatures[4]


def test_fast_path_same_with_and_without_kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampling, log-probs and gradients of the fast path agree with the kernels on and off
    (`GRPO_NATIVE=0` does the same as kernels() returning None). The LoRA dropout positions come
    from torch's generator in both runs (the native one draws another stream)."""
    monkeypatch.setattr(fastpath, "dropped_positions", fastpath.torch_dropped_positions)
    path = build_tiny_model(tmp_path / "tiny", seed=3, hidden_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, intermediate_size=128)  # fmt: skip
    model, tok = random_lora_policy(path)
    prompts = ["nums: 1 2 3 target: 6\n", "x"]
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0)

    def run() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        gen = CpuFastEngine(model, tok, cfg)
        ro = gen.generate(prompts, 4, generator=torch.Generator().manual_seed(0))
        model.train()
        torch.manual_seed(0)
        logp = fastpath.completion_logprobs_fast(
            gen.fast, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask
        )  # (N, T)
        model.zero_grad()
        (logp * ro.completion_mask).sum().backward()
        model.eval()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return ro.completion_ids, logp.detach(), grads

    ids_on, logp_on, grads_on = run()
    monkeypatch.setattr(fastpath, "kernels", lambda: None)
    ids_off, logp_off, grads_off = run()
    assert torch.equal(ids_on, ids_off)
    torch.testing.assert_close(logp_on, logp_off, rtol=1e-4, atol=1e-5)
    for on, off in zip(grads_on, grads_off):  # float rounding, bounded relative to each tensor's scale
        torch.testing.assert_close(on, off, rtol=1e-3, atol=1e-4 * off.abs().max().item())


def test_env_switch_turns_kernels_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRPO_NATIVE", "0")
    kernels.cache_clear()
    try:
        assert kernels() is None
    finally:
        monkeypatch.delenv("GRPO_NATIVE")
        kernels.cache_clear()


@pytest.mark.parametrize("transpose", [False, True])
def test_rotary_matches_torch(native: NativeKernels, threads: int, transpose: bool) -> None:
    g = torch.Generator().manual_seed(2)
    n, heads, length, d = 3, 5, 11, 16
    cos, sin = torch.rand(n, 1, length, d, generator=g), torch.rand(n, 1, length, d, generator=g) - 0.5
    half = d // 2
    first, second = (sin[..., half:], sin[..., :half]) if transpose else (sin[..., :half], sin[..., half:])
    for x in (
        torch.randn(n, length, heads, d, generator=g).transpose(1, 2),  # heads of a (n, L, H D) projection
        torch.randn(n, heads, length, d, generator=g),  # contiguous, as a gradient may come
    ):
        want = x * cos + torch.cat([x[..., half:] * first, x[..., :half] * second], dim=-1)
        got = native.rotary(x, cos, sin, transpose=transpose)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert got.transpose(1, 2).is_contiguous()


def test_lora_dropout_corrections_match_dropped_copies(native: NativeKernels, threads: int) -> None:
    """x A^T corrected at the dropped entries equals xd A^T; the backward correction gives
    gxa^T xd and removes gxa A at the dropped entries; ranks above 64 are refused."""
    g = torch.Generator().manual_seed(3)
    m, d_in, r = 300, 48, 16
    x, a = torch.randn(m, d_in, generator=g), torch.randn(r, d_in, generator=g)
    drops = fastpath.dropped_positions(m * d_in, 0.1, torch.device("cpu"))
    xd = x.clone()
    xd.view(-1)[drops] = 0
    xa = torch.mm(x, a.t())
    native.lora_drop_xa(x, drops, a.t().contiguous(), xa)
    torch.testing.assert_close(xa, xd @ a.t(), rtol=1e-5, atol=1e-5)

    gxa, rest = torch.randn(m, r, generator=g), torch.randn(m, d_in, generator=g)
    gx = rest + gxa @ a
    corr = native.lora_drop_backward(x, drops, gxa, a.t().contiguous(), gx)
    torch.testing.assert_close(gxa.t() @ x - corr.t(), gxa.t() @ xd, rtol=1e-4, atol=1e-4)
    keep = torch.ones(m * d_in)
    keep[drops] = 0
    torch.testing.assert_close(gx, rest + (gxa @ a) * keep.view(m, d_in), rtol=1e-5, atol=1e-5)

    wide = torch.randn(m, 65)
    with pytest.raises(ValueError, match="rank 65"):
        native.lora_drop_xa(x, drops, torch.randn(d_in, 65), wide)


def test_dropped_positions_are_a_function_of_the_seed(native: NativeKernels) -> None:
    """The same seed gives the same positions (also through the larger-cap retry, which a cap
    one short of the count forces); another seed other ones; p outside (0, 1) is refused."""
    n, p = 50_000, 0.05
    drops = native.dropped_positions(n, p, 123)
    assert torch.equal(drops, native.dropped_positions(n, p, 123))
    assert not torch.equal(drops, native.dropped_positions(n, p, 124))
    assert torch.equal(native.dropped_positions(n, p, 123 - 2**64), drops)  # seeds are taken mod 2^64
    k, inv_log_q = drops.numel(), 1.0 / math.log1p(-p)
    short = torch.empty(k - 1, dtype=torch.int64)
    assert native._dropped_positions(123, n, inv_log_q, short.data_ptr(), k - 1) == -1
    exact = torch.empty(k, dtype=torch.int64)
    assert native._dropped_positions(123, n, inv_log_q, exact.data_ptr(), k) == k
    assert torch.equal(exact, drops)
    assert native.dropped_positions(0, p, 1).numel() == 0
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="must be in"):
            native.dropped_positions(n, bad, 1)


def test_mkl_packed_gemm_matches_torch() -> None:
    """A packed right-hand side multiplies any row count as torch.mm does, into a new tensor or
    added into one; wrong shapes are refused."""
    from grpo.engines.cpu_fast.native import mkl_gemm

    gemm = mkl_gemm()
    if gemm is None:
        pytest.skip("torch has no MKL here")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 80, generator=g)
    packed, again = gemm.pack([w, w[:20]], rows=16)  # two packs in one allocation
    torch.testing.assert_close(gemm.mm(torch.ones(2, 20), again), torch.ones(2, 20) @ w[:20], rtol=1e-5, atol=1e-5)
    for m in (1, 16, 33):
        x, acc = torch.randn(m, 48, generator=g), torch.randn(m, 80, generator=g)
        torch.testing.assert_close(gemm.mm(x, packed), x @ w, rtol=1e-5, atol=1e-5)
        into = acc.clone()
        assert gemm.mm(x, packed, into) is into
        torch.testing.assert_close(into, acc + x @ w, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="x must be"):
        gemm.mm(torch.randn(4, 47), packed)
    with pytest.raises(ValueError, match="out must be"):
        gemm.mm(torch.randn(4, 48), packed, torch.randn(4, 79))


@pytest.mark.parametrize("hidden, heads, kv_heads", [(64, 4, 2), (112, 7, 1)])
def test_one_call_decode_step_samples_the_same_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hidden: int, heads: int, kv_heads: int
) -> None:
    """Generation with the whole decode step in one native call (MKL-packed products) and with
    the operator-by-operator loop: the same tokens (GQA rep 2 and 7); a bad token or slot is
    refused."""
    from grpo.engines.cpu_fast.native import mkl_gemm

    if mkl_gemm() is None or kernels() is None:
        pytest.skip("no MKL or no native kernels here")
    path = build_tiny_model(tmp_path / "tiny", seed=4, hidden_size=hidden, num_layers=2, num_heads=heads,
                            num_kv_heads=kv_heads, intermediate_size=2 * hidden)  # fmt: skip
    model, tok = random_lora_policy(path)
    cfg = GenerationConfig(max_new_tokens=10, temperature=1.0)
    prompts = ["nums: 1 2 3 target: 6\n", "x"]

    def tokens() -> torch.Tensor:
        gen = CpuFastEngine(model, tok, cfg)
        return gen.generate(prompts, 3, generator=torch.Generator().manual_seed(0)).completion_ids

    calls = []
    real = fastpath.DecodeStep.__call__
    monkeypatch.setattr(fastpath.DecodeStep, "__call__", lambda self, *a: calls.append(a[-1]) or real(self, *a))
    one_call = tokens()
    assert calls and calls[:3] == [0, 1, 2]  # the native step ran, one call per token
    monkeypatch.setattr(fastpath, "mkl_gemm", lambda: None)
    assert torch.equal(one_call, tokens())

    fast = fastpath.FastQwen2(model)
    ids = tok(prompts, return_tensors="pt", padding=True)
    u, n = 2, 4
    p = ids.input_ids.shape[1]
    caches = [(torch.zeros(u, kv_heads, p, 16), torch.zeros(u, kv_heads, p, 16), torch.zeros(n, kv_heads, 5, 16),
               torch.zeros(n, kv_heads, 5, 16)) for _ in fast.gen_layers]  # fmt: skip
    step = fast._decode_step(kernels(), mkl_gemm(), caches, torch.zeros(u, p), torch.tensor([0, 0, 1, 1]))
    cos = torch.ones(n, 16)
    assert step(torch.tensor([1, 2, 3, 4]), cos, cos, 0).shape == (n, fast.lm_head.shape[0])
    with pytest.raises(ValueError, match="vocabulary"):
        step(torch.tensor([1, 2, 3, 10**6]), cos, cos, 0)
    with pytest.raises(ValueError, match="slot"):
        step(torch.tensor([1, 2, 3, 4]), cos, cos, 5)


def test_sampler_draws_pick_tokens_token(native: NativeKernels, threads: int) -> None:
    """The one-pass inverse-CDF sampler picks what `pick_tokens` picks from the same uniforms
    (a vocabulary not a multiple of 16, temperatures, the stop-token bias), never a token of
    zero mass, and refuses rows where every token has zero mass."""
    from grpo.engines.base import pick_tokens

    g = torch.Generator().manual_seed(0)
    n, v = 600, 301
    logits = torch.randn(n, v, generator=g) * 3
    logits[:, 7] = float("-inf")
    bias = torch.zeros(v)
    bias[[0, 300]] = float("-inf")
    for temperature, add in ((1.0, None), (0.7, bias)):
        u = torch.rand(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        got = native.sample_inverse_cdf(logits, add, temperature, u)
        want = pick_tokens(logits + (add if add is not None else 0), False, torch.Generator().manual_seed(1),
                           temperature, sampler="inverse_cdf")  # fmt: skip
        assert (got == want).float().mean() > 0.99  # float rounding may move a draw on a boundary
        assert not bool(torch.isin(got, torch.tensor([7] if add is None else [0, 7, 300])).any())
    edge = torch.full((2, v), float("-inf"))
    edge[0, 5] = 0.0  # one token of mass: drawn for every u, even u just below 1
    got = native.sample_inverse_cdf(edge[:1], None, 1.0, torch.tensor([[1 - 2**-53]], dtype=torch.float64))
    assert got.tolist() == [5]
    with pytest.raises(ValueError, match="zero probability"):
        native.sample_inverse_cdf(edge, None, 1.0, torch.zeros(2, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="float64"):
        native.sample_inverse_cdf(logits, None, 1.0, torch.zeros(n, 1))
