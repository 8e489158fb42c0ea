"""Sampling loop against independent references, and the vLLM backend against a fake engine."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from grpo.config import GenerationConfig, ModelConfig, RunConfig
from grpo.engines import Rollout, make_engine
from grpo.engines.base import filter_logits
from grpo.engines.cpu_fast import CpuFastEngine
from grpo.engines.hf import HFEngine
from grpo.engines.vllm import VLLM_MISSING, EngineCache, VLLMEngine, kv_cache_bytes
from grpo.errors import UserError
from grpo.models import build_tiny_model, load_base_model, load_policy, stop_token_ids

USERS = ["nums: 1 2 3 target: 6", "nums: 93 4 68 target: 29, and a longer prompt than the others", "x"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("rollout") / "tiny", seed=0)


@pytest.fixture(scope="module")
def cfg(tiny: Path) -> RunConfig:
    return RunConfig.model_validate({"model": {"name_or_path": str(tiny), "device": "cpu"}})


@pytest.fixture(scope="module")
def policy(cfg: RunConfig):
    """The tiny model with a random (non-zero) LoRA adapter, so the adapter visibly matters."""
    model, tok = load_policy(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.eval()
    return model, tok


@pytest.fixture(scope="module")
def prompts(policy) -> list[str]:
    _, tok = policy
    return [
        tok.apply_chat_template(
            [{"role": "user", "content": u}, {"role": "assistant", "content": "<think>"}],
            tokenize=False,
            continue_final_message=True,
        )
        for u in USERS
    ]


def gen_cfg(**kw: Any) -> GenerationConfig:
    return GenerationConfig(**{"max_new_tokens": 16, **kw})


def reference_greedy(model, tok, prompt: str, max_new: int, stops: set[int]) -> list[int]:
    """No cache, no padding: recompute the full forward pass for every new token."""
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]  # (1, P)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            out.append(nxt)
            if nxt in stops:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def first_stop(row: list[int], stops: set[int]) -> int | None:
    return next((i for i, t in enumerate(row) if t in stops), None)


def test_shapes_and_grouping(policy, prompts) -> None:
    model, tok = policy
    r = HFEngine(model, tok, gen_cfg()).generate(
        prompts, 4, generator=torch.Generator().manual_seed(0)
    )
    assert isinstance(r, Rollout)
    n = len(prompts) * 4
    assert r.prompt_ids.shape[0] == r.prompt_mask.shape[0] == n == len(r.texts) == r.truncated.shape[0]
    assert r.completion_ids.shape == r.completion_mask.shape and r.completion_ids.shape[1] <= 16
    for i, p in enumerate(prompts):
        want = tok(p, add_special_tokens=False)["input_ids"]
        for j in range(4):
            row = i * 4 + j
            mask = r.prompt_mask[row].bool()
            assert r.prompt_ids[row][mask].tolist() == want  # the prompt, left-padded
            assert not mask[: mask.numel() - len(want)].any() and mask[-len(want):].all()
            assert (r.prompt_ids[row][~mask] == tok.pad_token_id).all()


def test_greedy_matches_uncached_reference(policy, prompts) -> None:
    model, tok = policy
    stops = set(stop_token_ids(tok))
    g = HFEngine(model, tok, gen_cfg())
    r = g.generate(prompts, 2, greedy=True, max_new_tokens=20)
    again = g.generate(prompts, 2, greedy=True, max_new_tokens=20)
    assert torch.equal(r.completion_ids, again.completion_ids)
    for i, p in enumerate(prompts):
        want = reference_greedy(model, tok, p, 20, stops)
        for row in (2 * i, 2 * i + 1):
            assert r.completion_ids[row][r.completion_mask[row].bool()].tolist() == want
    # not a degenerate model: rows differ and tokens vary within a row
    assert len({tuple(x) for x in r.completion_ids.tolist()}) == len(prompts)
    assert len(set(r.completion_ids[0].tolist())) > 5
    # the adapter is active while sampling
    with model.disable_adapter():
        base = g.generate(prompts, 1, greedy=True, max_new_tokens=20)
    assert not torch.equal(base.completion_ids, r.completion_ids[::2])


def test_plain_model_without_adapter(cfg: RunConfig, policy, prompts) -> None:
    _, tok = policy
    base = load_base_model(cfg.model)
    r = HFEngine(base, tok, gen_cfg()).generate(prompts, 1, greedy=True, max_new_tokens=6)
    stops = set(stop_token_ids(tok))
    for i, p in enumerate(prompts):
        assert r.completion_ids[i][r.completion_mask[i].bool()].tolist() == reference_greedy(base, tok, p, 6, stops)


def test_completion_mask_stop_and_truncation(policy, prompts) -> None:
    model, tok = policy
    stops = set(range(100, 140)) | set(stop_token_ids(tok))
    g = HFEngine(model, tok, gen_cfg(), stop_ids=sorted(stops))
    r = g.generate(prompts, 8, max_new_tokens=16, generator=torch.Generator().manual_seed(3))
    ids, mask = r.completion_ids.tolist(), r.completion_mask.tolist()
    n_stopped = 0
    for row, m, trunc in zip(ids, mask, r.truncated.tolist()):
        k = first_stop(row, stops)
        if k is None:
            assert trunc and len(row) == 16 and all(m)
        else:
            n_stopped += 1
            assert not trunc
            assert m == [1] * (k + 1) + [0] * (len(row) - k - 1)
            assert all(t == tok.pad_token_id for t in row[k + 1:])
    assert 0 < n_stopped < len(ids), "the seed should give both stopped and truncated rows"


def test_texts_are_decoded_masked_ids_without_stop(policy, prompts) -> None:
    model, tok = policy
    stops = set(range(100, 140)) | set(stop_token_ids(tok))
    g = HFEngine(model, tok, gen_cfg(), stop_ids=sorted(stops))
    r = g.generate(prompts, 4, generator=torch.Generator().manual_seed(5))
    for row, m, trunc, text in zip(r.completion_ids, r.completion_mask, r.truncated, r.texts):
        kept = row[m.bool()].tolist()
        if not trunc:
            kept = kept[:-1]
        assert text == tok.decode(kept, skip_special_tokens=True)


def test_min_new_tokens_forces_exact_length(policy, prompts) -> None:
    model, tok = policy
    stops = set(range(100, 140)) | set(stop_token_ids(tok))
    g = HFEngine(model, tok, gen_cfg(), stop_ids=sorted(stops))
    r = g.generate(prompts, 8, max_new_tokens=12, min_new_tokens=12, generator=torch.Generator().manual_seed(3))
    assert r.completion_ids.shape == (24, 12)
    assert r.completion_mask.all() and r.truncated.all()
    assert not any(t in stops for t in r.completion_ids.flatten().tolist())
    # min_new_tokens below the limit only delays the stop
    r = g.generate(prompts, 8, max_new_tokens=16, min_new_tokens=6, generator=torch.Generator().manual_seed(3))
    for row in r.completion_ids.tolist():
        k = first_stop(row, stops)
        assert k is None or k >= 6


def test_seeded_generator_reproducible(policy, prompts) -> None:
    model, tok = policy
    g = HFEngine(model, tok, gen_cfg())
    a = g.generate(prompts, 3, generator=torch.Generator().manual_seed(7))
    b = g.generate(prompts, 3, generator=torch.Generator().manual_seed(7))
    c = g.generate(prompts, 3, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert not torch.equal(a.completion_ids, c.completion_ids)
    # samples within a group differ
    assert len({tuple(x) for x in a.completion_ids[:3].tolist()}) == 3


def test_rollout_tensors_can_enter_autograd(policy, prompts) -> None:
    model, tok = policy
    r = HFEngine(model, tok, gen_cfg()).generate(prompts, 2, max_new_tokens=6)
    assert not any(t.is_inference() for t in (r.prompt_ids, r.completion_ids, r.completion_mask))
    ids = torch.cat([r.prompt_ids, r.completion_ids], dim=1)  # (N, P + T)
    mask = torch.cat([r.prompt_mask, r.completion_mask], dim=1)  # (N, P + T)
    t = r.completion_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -t - 1 : -1]  # (N, T, V)
    logp = logits.log_softmax(-1).gather(-1, r.completion_ids[..., None])[..., 0]  # (N, T)
    (logp * r.completion_mask).sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None for g in grads)
    model.zero_grad(set_to_none=True)


def test_duplicate_prompts_keep_order(policy, prompts) -> None:
    model, tok = policy
    g = HFEngine(model, tok, gen_cfg())
    batch = [prompts[0], prompts[1], prompts[0]]
    r = g.generate(batch, 2, greedy=True, max_new_tokens=8)
    assert torch.equal(r.prompt_ids[0:2], r.prompt_ids[4:6])
    assert torch.equal(r.completion_ids[0:2], r.completion_ids[4:6])
    single = g.generate([prompts[1]], 2, greedy=True, max_new_tokens=8)
    assert torch.equal(single.completion_ids, r.completion_ids[2:4, : single.completion_ids.shape[1]])


def test_top_k_one_equals_greedy_and_training_mode_restored(policy, prompts) -> None:
    model, tok = policy
    greedy = HFEngine(model, tok, gen_cfg()).generate(prompts, 2, greedy=True)
    model.train()
    try:
        top1 = HFEngine(model, tok, gen_cfg(top_k=1)).generate(
            prompts, 2, generator=torch.Generator().manual_seed(0)
        )
        assert model.training
    finally:
        model.eval()
    assert torch.equal(greedy.completion_ids, top1.completion_ids)


def test_filter_logits_reference() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))
    inf = float("-inf")
    k2 = filter_logits(logits, top_k=2)
    assert torch.isinf(k2).tolist() == [[False, False, True, True], [True, True, False, False]]
    p = filter_logits(logits, top_p=0.7)  # smallest set with mass >= 0.7
    assert (p == inf).tolist() == [[False, False, True, True], [True, True, False, False]]
    p = filter_logits(logits, top_p=0.85)
    assert (p == inf).tolist() == [[False, False, False, True], [True, False, False, False]]
    assert torch.equal(filter_logits(logits), logits)
    kept = filter_logits(logits, top_k=3, top_p=0.85)
    assert torch.equal(kept[~torch.isinf(kept)], logits[~torch.isinf(kept)])


def test_make_engine_backends(policy, cfg: RunConfig) -> None:
    model, tok = policy
    assert type(make_engine(model, tok, cfg)) is CpuFastEngine
    plain = cfg.model_copy(update={"generation": cfg.generation.model_copy(update={"fast_path": False})})
    assert type(make_engine(model, tok, plain)) is HFEngine
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed; the missing-extra message cannot be checked")
    vllm_cfg = cfg.model_copy(update={"generation": cfg.generation.model_copy(update={"backend": "vllm"})})
    with pytest.raises(UserError) as err:
        make_engine(model, tok, vllm_cfg)
    assert str(err.value) == VLLM_MISSING and "\n" not in VLLM_MISSING


# --------------------------------------------------------------------------- fake vLLM


@dataclass
class FakeSamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = 16
    min_tokens: int = 0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)


@dataclass
class FakeLoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


@dataclass
class FakeCompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class FakeRequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[FakeCompletionOutput]


class FakeLLM:
    """Records what the generator asks of `vllm.LLM`; answers like vLLM's offline API."""

    instances: list[FakeLLM] = []

    def __init__(self, hf_tokenizer: Any, stop: int, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.tokenizer = hf_tokenizer
        self.stop = stop
        self.calls: list[tuple] = []
        self.asleep = False
        FakeLLM.instances.append(self)

    def sleep(self, level: int = 1) -> None:
        self.calls.append(("sleep", level))
        self.asleep = True

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.calls.append(("wake_up",))
        self.asleep = False

    def generate(self, prompts, sampling_params=None, lora_request=None, use_tqdm=True):
        assert not self.asleep, "generate on a sleeping engine"
        assert (Path(lora_request.lora_path) / "adapter_model.safetensors").is_file()
        assert isinstance(sampling_params, list) and len(sampling_params) == len(prompts)  # one per prompt
        self.calls.append(("generate", lora_request.lora_int_id, sampling_params))
        outs = []
        for i, (p, sp) in enumerate(zip(prompts, sampling_params)):
            ids = p["prompt_token_ids"]
            samples = []
            for j in range(sp.n):
                if j % 2 == 0:  # stops after 2 tokens + the stop token
                    toks, reason = [10 + j, ids[-1], self.stop], "stop"
                else:  # runs to the limit
                    toks, reason = [20 + i] * sp.max_tokens, "length"
                text = self.tokenizer.decode(toks, skip_special_tokens=True)
                samples.append(FakeCompletionOutput(j, text, toks, reason))
            outs.append(FakeRequestOutput(str(i), list(ids), samples))
        return outs


def fake_vllm(
    model, tok, gen: GenerationConfig, model_cfg: ModelConfig, tmp_path: Path, engines: EngineCache | None = None,
    factory: Any = None,
) -> VLLMEngine:
    stop = stop_token_ids(tok)[0]
    return VLLMEngine(
        model, tok, gen, model_cfg,
        engine_factory=factory or (lambda **kw: FakeLLM(tok, stop, **kw)),
        sampling_params_cls=FakeSamplingParams,
        lora_request_cls=FakeLoRARequest,
        adapter_root=str(tmp_path / "adapters"),
        engines=engines or EngineCache(),
    )


def test_vllm_engine_options_and_sampling_params(policy, cfg: RunConfig, tmp_path: Path) -> None:
    model, tok = policy
    gen = gen_cfg(temperature=0.7, top_p=0.9, top_k=0, vllm={"max_num_seqs": 3, "gpu_memory_utilization": 0.25})
    v = fake_vllm(model, tok, gen, cfg.model, tmp_path)
    llm = FakeLLM.instances[-1]
    kw = llm.kwargs
    assert kw["model"] == cfg.model.name_or_path and kw["enable_lora"] is True
    assert kw["enable_sleep_mode"] is True and kw["max_num_seqs"] == 3
    assert kw["gpu_memory_utilization"] == 0.25 and kw["max_model_len"] == 1024
    assert kw["max_lora_rank"] >= cfg.lora.r and kw["dtype"] == "float32"

    assert "distributed_executor_backend" not in kw  # one process: vLLM's own executor

    v.generate(["a", "b", "a"], 4, max_new_tokens=9, min_new_tokens=2, generator=torch.Generator().manual_seed(0))
    sps = llm.calls[-1][2]
    for sp in sps:
        assert (sp.n, sp.temperature, sp.top_p, sp.top_k, sp.max_tokens, sp.min_tokens) == (4, 0.7, 0.9, -1, 9, 2)
        assert isinstance(sp.seed, int) and set(sp.stop_token_ids) == set(stop_token_ids(tok))
    # One seed per prompt, spaced by the group size: vLLM seeds child j with seed + j, so no two
    # samples of the step (even of a repeated prompt) share a random stream.
    children = [sp.seed + j for sp in sps for j in range(4)]
    assert len(set(children)) == 12
    v.generate(["a"], 2, greedy=True)
    (sp,) = llm.calls[-1][2]
    assert (sp.temperature, sp.top_k, sp.max_tokens, sp.seed) == (0.0, -1, 16, None)
    v2 = fake_vllm(model, tok, gen_cfg(top_k=5), cfg.model, tmp_path / "v2")
    v2.generate(["a"], 2)
    assert FakeLLM.instances[-1].calls[-1][2][0].top_k == 5


def test_vllm_kv_cache_byte_budget(policy, cfg: RunConfig, tmp_path: Path) -> None:
    """`generation.vllm.kv_cache_memory_bytes`: absent by default (a share of the GPU), passed as
    given, or `auto` = what max_num_seqs sequences of max_model_len tokens need."""
    from transformers import Qwen2Config

    model, tok = policy
    fake_vllm(model, tok, gen_cfg(), cfg.model, tmp_path / "a")
    assert "kv_cache_memory_bytes" not in FakeLLM.instances[-1].kwargs
    fake_vllm(model, tok, gen_cfg(vllm={"kv_cache_memory_bytes": 2**30}), cfg.model, tmp_path / "b")
    assert FakeLLM.instances[-1].kwargs["kv_cache_memory_bytes"] == 2**30
    auto = gen_cfg(vllm={"kv_cache_memory_bytes": "auto", "max_num_seqs": 8, "max_model_len": 64})
    fake_vllm(model, tok, auto, cfg.model, tmp_path / "c")
    c = model.config  # float32: 4 bytes per value, keys and values of every layer's KV heads
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    assert FakeLLM.instances[-1].kwargs["kv_cache_memory_bytes"] == per_token * 8 * 64
    qwen_half_b = Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2)
    assert kv_cache_bytes(qwen_half_b, 1, 1, "bfloat16") == 12 * 1024  # Qwen2.5-0.5B: 12 KiB per token


def test_vllm_engine_under_torchrun_uses_the_external_launcher(
    policy, cfg: RunConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each rank's engine in the rank's own process on its own device (not all on device 0)."""
    model, tok = policy
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29555"}.items():
        monkeypatch.setenv(key, value)
    fake_vllm(model, tok, gen_cfg(), cfg.model, tmp_path)
    kw = FakeLLM.instances[-1].kwargs
    assert kw["distributed_executor_backend"] == "external_launcher" and kw["seed"] == 1
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(UserError, match="MASTER_PORT not set"):
        fake_vllm(model, tok, gen_cfg(), cfg.model, tmp_path / "b")


def test_one_engine_per_process_shared_by_generators(policy, cfg: RunConfig, tmp_path: Path) -> None:
    """A training round's generator and an evaluation's share the engine; their adapters never
    share a LoRA id; other settings replace the engine (shut down first); close frees it."""
    model, tok = policy
    stop = stop_token_ids(tok)[0]
    shutdowns: list[int] = []

    class Core:
        def __init__(self, n: int) -> None:
            self.n = n

        def shutdown(self) -> None:
            shutdowns.append(self.n)

    def factory(**kw: Any) -> FakeLLM:
        llm = FakeLLM(tok, stop, **kw)
        llm.llm_engine = SimpleNamespace(engine_core=Core(len(FakeLLM.instances)))
        return llm

    engines = EngineCache()
    train = fake_vllm(model, tok, gen_cfg(), cfg.model, tmp_path / "t", engines, factory)
    evaluation = fake_vllm(model, tok, gen_cfg(), cfg.model, tmp_path / "e", engines, factory)
    assert train.llm is evaluation.llm and FakeLLM.instances[-1] is train.llm  # built once
    train.sync(model)
    assert [train.lora_request.lora_int_id, evaluation.lora_request.lora_int_id] == [3, 2]
    train.generate(["a"], 2)
    train.sleep()  # training put the engine to sleep: the evaluation's generator wakes it to sample
    evaluation.generate(["a"], 2)
    assert [c[0] for c in train.llm.calls] == ["generate", "sleep", "wake_up", "generate"]
    first = train.llm
    other = fake_vllm(model, tok, gen_cfg(vllm={"max_model_len": 512}), cfg.model, tmp_path / "o", engines, factory)
    assert other.llm is not first and shutdowns == [first.llm_engine.engine_core.n]
    assert other.lora_request.lora_int_id == 1
    engines.close()
    assert len(shutdowns) == 2 and engines.engine is None
    folder = Path(evaluation.lora_request.lora_path)
    evaluation.close()
    assert not folder.exists()  # its adapter folder is deleted


def test_vllm_rollout_from_outputs(policy, prompts, cfg: RunConfig, tmp_path: Path) -> None:
    model, tok = policy
    v = fake_vllm(model, tok, gen_cfg(), cfg.model, tmp_path)
    r = v.generate(prompts[:2], 4, max_new_tokens=6)
    stop, pad = stop_token_ids(tok)[0], tok.pad_token_id
    assert r.completion_ids.shape == (8, 6) and r.prompt_ids.shape[0] == 8
    for i, p in enumerate(prompts[:2]):
        want_prompt = tok(p, add_special_tokens=False)["input_ids"]
        for j in range(4):
            row = i * 4 + j
            assert r.prompt_ids[row][r.prompt_mask[row].bool()].tolist() == want_prompt
            if j % 2 == 0:
                want = [10 + j, want_prompt[-1], stop]
                assert r.completion_ids[row].tolist() == want + [pad] * 3
                assert r.completion_mask[row].tolist() == [1, 1, 1, 0, 0, 0]
                assert not r.truncated[row]
                assert r.texts[row] == tok.decode(want[:-1], skip_special_tokens=True)
            else:
                assert r.completion_ids[row].tolist() == [20 + i] * 6
                assert r.completion_mask[row].all() and r.truncated[row]
                assert r.texts[row] == tok.decode([20 + i] * 6)


def test_vllm_sleep_wake_and_weight_sync(policy, cfg: RunConfig, tmp_path: Path) -> None:
    model, tok = policy
    v = fake_vllm(model, tok, gen_cfg(), cfg.model, tmp_path)
    llm = FakeLLM.instances[-1]
    first = v.lora_request
    assert first.lora_int_id == 1 and (Path(first.lora_path) / "adapter_model.safetensors").is_file()

    name, param = next((n, p) for n, p in model.named_parameters() if "lora_A" in n)
    before = param.detach().clone()
    v.generate(["a"], 2)
    v.sleep()  # training step happens here
    try:
        with torch.no_grad():
            param.add_(0.01)
        v.sync(model)
        updated = param.detach().clone()
    finally:
        with torch.no_grad():
            param.copy_(before)
    v.wake()
    v.generate(["a"], 2)
    assert [c[:2] if c[0] == "generate" else c for c in llm.calls] == [
        ("generate", 1), ("sleep", 1), ("wake_up",), ("generate", 2)
    ]
    second = v.lora_request
    assert second.lora_int_id == 2 and second.lora_path != first.lora_path
    assert (Path(second.lora_path) / "adapter_model.safetensors").is_file()
    assert not Path(first.lora_path).exists()  # old adapters are cleaned up

    from safetensors.torch import load_file

    saved = load_file(str(Path(second.lora_path) / "adapter_model.safetensors"))
    assert torch.equal(saved[name.replace(".default", "")], updated)  # the new weights were saved

    # without sleep mode, sleep/wake do not touch the engine
    quiet = fake_vllm(model, tok, gen_cfg(vllm={"sleep_mode": False}), cfg.model, tmp_path / "q")
    quiet.sleep()
    quiet.wake()
    assert FakeLLM.instances[-1].calls == []
    assert FakeLLM.instances[-1].kwargs["enable_sleep_mode"] is False
