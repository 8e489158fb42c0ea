"""GPU smoke checks of the reference recipe's code paths, one JSON result; on a CPU it runs what a CPU can.

    python benchmarks/gpu_smoke.py --out smoke.json            # Tier A (no vLLM) + Tier B (vLLM, if installed)
    python benchmarks/gpu_smoke.py --tiers A --out smoke.json

Tier A, without vLLM: the device and dtypes of a loaded policy (bfloat16 base, float32 LoRA on a
GPU); the fast path's log-probs and LoRA gradients against the transformers path's; the
transformers generator's shapes, stop-token mask and seeds; a checkpoint round trip; on a GPU, the
peak memory and time of one reference-sized update (a Qwen2.5-0.5B-shaped model with random
weights, 80 rows x (130 + 896) tokens, micro-batches of 4), with and without gradient
checkpointing. Tier B, with vLLM: the engine built with the project's arguments, stop and length
semantics, seeds, the LoRA adapter applied and re-synced (greedy tokens equal to transformers'),
sleep freeing memory (GPU only), the sampler-vs-trainer log-prob gap, two GRPO steps through the
trainer, and a second engine after close. Every check reports pass / fail / skip and what it
measured; the exit status is 1 when one failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CHECKS: list[tuple[str, str, Callable[[dict[str, Any]], dict[str, Any]]]] = []


def check(tier: str, name: str) -> Callable:
    def deco(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable:
        CHECKS.append((tier, name, fn))
        return fn

    return deco


class Skip(Exception):
    """The check cannot run here (no GPU, no vLLM); the reason is recorded."""


def _cuda() -> bool:
    return torch.cuda.is_available()


def _config(ctx: dict[str, Any], *extra: str) -> Any:
    from grpo.config import load_config

    dtype = "bfloat16" if _cuda() else "float32"
    return load_config(None, [
        f"model.name_or_path={ctx['model_dir']}", "model.build_tiny_if_missing=false", f"model.dtype={dtype}",
        "generation.max_new_tokens=16", "train.prompts_per_step=2", "train.group_size=4",
        "train.micro_batch_size=4", "lora.dropout=0", *extra,
    ])


PROMPTS = ["nums: 1 2 3 target: 6", "nums: 93 4 68 target: 29"]


# ------------------------------------------------------------------------------------- Tier A


@check("A", "device_and_dtype")
def device_and_dtype(ctx: dict[str, Any]) -> dict[str, Any]:
    from grpo.models import load_policy

    model, _ = load_policy(_config(ctx))
    devices = {str(p.device) for p in model.parameters()}
    lora = {str(p.dtype) for n, p in model.named_parameters() if "lora_" in n}
    base = {str(p.dtype) for n, p in model.named_parameters() if "lora_" not in n}
    ok = lora == {"torch.float32"} and len(devices) == 1
    return {"ok": ok, "devices": sorted(devices), "base_dtypes": sorted(base), "lora_dtypes": sorted(lora),
            "bf16_supported": bool(_cuda() and torch.cuda.is_bf16_supported())}


@check("A", "fast_path_vs_transformers")
def fast_path_vs_transformers(ctx: dict[str, Any]) -> dict[str, Any]:
    from grpo.algorithm import completion_logprobs
    from grpo.engines.cpu_fast import CpuFastEngine
    from grpo.engines.cpu_fast.qwen2 import unsupported_reason
    from grpo.models import load_policy

    cfg = _config(ctx)
    model, tok = load_policy(cfg)
    if unsupported_reason(model) is not None:
        raise Skip(f"fast path not available: {unsupported_reason(model)}")
    gen = CpuFastEngine(model, tok, cfg.generation)
    r = gen.generate(PROMPTS, 4, generator=torch.Generator(device=model.device).manual_seed(0))
    args = (r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    out: dict[str, Any] = {}
    for adapter in (True, False):
        with torch.no_grad():
            if adapter:
                slow = completion_logprobs(model, *args)
            else:
                with model.disable_adapter():
                    slow = completion_logprobs(model, *args)
            fast = gen.logprobs(*args, adapter=adapter)
        mask = r.completion_mask.bool()
        out[f"max_abs_diff_adapter_{adapter}"] = float((slow - fast)[mask].abs().max())
    tolerance = 5e-2 if _cuda() else 1e-3
    out["ok"] = all(v < tolerance for k, v in out.items() if k.startswith("max_abs"))
    out["tolerance"] = tolerance
    return out


@check("A", "transformers_generator")
def transformers_generator(ctx: dict[str, Any]) -> dict[str, Any]:
    from grpo.engines.hf import HFEngine
    from grpo.models import load_policy, stop_token_ids

    cfg = _config(ctx)
    model, tok = load_policy(cfg)
    gen = HFEngine(model, tok, cfg.generation)
    seed = torch.Generator(device=model.device)
    a = gen.generate(PROMPTS, 4, generator=seed.manual_seed(1))
    b = gen.generate(PROMPTS, 4, generator=seed.manual_seed(1))
    stops = set(stop_token_ids(tok))
    consistent = all(
        bool(t) == (not any(int(i) in stops for i in ids[m.bool()].tolist()[-1:]))
        for ids, m, t in zip(a.completion_ids, a.completion_mask, a.truncated)
    )
    return {"ok": torch.equal(a.completion_ids, b.completion_ids) and consistent and a.num_sequences == 8,
            "shape": list(a.completion_ids.shape), "truncated_consistent": consistent}


@check("A", "checkpoint_round_trip")
def checkpoint_round_trip(ctx: dict[str, Any]) -> dict[str, Any]:
    from grpo.checkpoint import load_checkpoint, save_checkpoint
    from grpo.countdown import generate
    from grpo.models import load_policy
    from grpo.trainer import GRPOTrainer

    cfg = _config(ctx)
    rows = generate(32, seed=0)
    model, tok = load_policy(cfg)
    straight = GRPOTrainer(cfg, model, tok, rows, total_steps=2)
    straight.train(2, progress=False)
    want = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}
    model, tok = load_policy(cfg)
    first = GRPOTrainer(cfg, model, tok, rows, total_steps=2)
    first.train(1, progress=False)
    path = save_checkpoint(Path(ctx["tmp"]) / "ckpt", model=model, tokenizer=tok, optimizer=first.optimizer,
                           scheduler=first.scheduler, state=first.state())
    model, tok = load_policy(cfg)
    second = GRPOTrainer(cfg, model, tok, rows, total_steps=2)
    second.load_state(load_checkpoint(path, model=model, optimizer=second.optimizer, scheduler=second.scheduler))
    second.train(1, progress=False)
    gap = max(float((v - want[k]).abs().max()) for k, v in model.named_parameters() if "lora_" in k)
    return {"ok": gap < (1e-2 if _cuda() else 1e-6), "max_abs_diff": gap}


@check("A", "reference_update_memory")
def reference_update_memory(ctx: dict[str, Any]) -> dict[str, Any]:
    """One update of a Qwen2.5-0.5B-shaped model (random weights) at the recipe's sizes."""
    if not _cuda():
        raise Skip("needs a GPU")
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from grpo.algorithm import policy_update
    from grpo.config import TrainConfig
    from grpo.engines import Rollout

    out: dict[str, Any] = {}
    for checkpointing in (False, True):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        config = Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                             rope_theta=1e6, max_position_embeddings=2048)
        with torch.device("cuda"):
            base = Qwen2ForCausalLM(config).to(torch.bfloat16)
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=64, lora_dropout=0.05, task_type="CAUSAL_LM",
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                "up_proj", "down_proj", "gate_proj"]))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        n, p, t = 80, 130, 896
        g = torch.Generator(device="cuda").manual_seed(0)
        rollout = Rollout(
            prompt_ids=torch.randint(0, 151_000, (n, p), device="cuda", generator=g),
            prompt_mask=torch.ones(n, p, dtype=torch.long, device="cuda"),
            completion_ids=torch.randint(0, 151_000, (n, t), device="cuda", generator=g),
            completion_mask=torch.ones(n, t, dtype=torch.long, device="cuda"),
            texts=[""] * n, truncated=torch.zeros(n, dtype=torch.bool, device="cuda"),
        )
        adv = torch.randn(n, device="cuda", generator=g) * (torch.arange(n, device="cuda") % 2)
        optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-6)
        start = time.perf_counter()
        stats = policy_update(model, optimizer, rollout, adv, cfg=TrainConfig(micro_batch_size=4, group_size=8,
                              prompts_per_step=10), temperature=1.0, max_new_tokens=t)
        torch.cuda.synchronize()
        key = "with_checkpointing" if checkpointing else "without_checkpointing"
        out[key] = {"peak_gib": torch.cuda.max_memory_allocated() / 2**30, "seconds": time.perf_counter() - start,
                    "grad_norm": stats["grad_norm"]}
        del model, base, optimizer
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    out["ok"] = out["without_checkpointing"]["peak_gib"] + 0.3 * total < 0.94 * total
    return out


# ------------------------------------------------------------------------------------- Tier B


def _vllm(ctx: dict[str, Any], **kwargs: Any) -> Any:
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise Skip("vLLM is not installed") from None
    from grpo.engines.vllm import VLLMEngine
    from grpo.models import load_policy

    cfg = _config(ctx, "generation.backend=vllm", f"generation.vllm.sleep_mode={str(_cuda()).lower()}",
                  "generation.vllm.max_model_len=256", "generation.vllm.gpu_memory_utilization=0.3")
    model, tok = load_policy(cfg)
    return cfg, model, tok, VLLMEngine(model, tok, cfg.generation, cfg.model, **kwargs)


@check("B", "vllm_lora_applied_and_resynced")
def vllm_lora(ctx: dict[str, Any]) -> dict[str, Any]:
    from grpo.engines import close_engines
    from grpo.engines.hf import HFEngine

    start = time.perf_counter()
    cfg, model, tok, engine = _vllm(ctx)
    built = time.perf_counter() - start
    hf = HFEngine(model, tok, cfg.generation)
    def first8(rollout: Any) -> torch.Tensor:
        return rollout.completion_ids.cpu()[:, :8]

    fresh = engine.generate(PROMPTS, 1, greedy=True)
    equal_fresh = torch.equal(first8(fresh), first8(hf.generate(PROMPTS, 1, greedy=True)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    engine.sync(model)
    moved = engine.generate(PROMPTS, 1, greedy=True)
    equal_moved = torch.equal(first8(moved), first8(hf.generate(PROMPTS, 1, greedy=True)))
    close_engines()
    return {"ok": equal_fresh and equal_moved and not torch.equal(fresh.completion_ids, moved.completion_ids),
            "engine_build_s": built, "equal_fresh": equal_fresh, "equal_after_sync": equal_moved}


@check("B", "vllm_sleep_frees_memory")
def vllm_sleep(ctx: dict[str, Any]) -> dict[str, Any]:
    if not _cuda():
        raise Skip("vLLM's CPU platform has no sleep mode")
    from grpo.engines import close_engines

    _, _, _, engine = _vllm(ctx)
    before = engine.generate(PROMPTS, 1, greedy=True)
    free0 = torch.cuda.mem_get_info()[0]
    start = time.perf_counter()
    engine.sleep()
    freed = (torch.cuda.mem_get_info()[0] - free0) / 2**30
    after = engine.generate(PROMPTS, 1, greedy=True)  # wakes it
    seconds = time.perf_counter() - start
    close_engines()
    return {"ok": freed > 0.2 * torch.cuda.get_device_properties(0).total_memory / 2**30
            and torch.equal(before.completion_ids, after.completion_ids), "freed_gib": freed,
            "sleep_and_wake_s": seconds}


@check("B", "vllm_logprob_gap_and_grpo_steps")
def vllm_steps(ctx: dict[str, Any]) -> dict[str, Any]:
    from grpo.countdown import generate
    from grpo.engines import close_engines
    from grpo.trainer import GRPOTrainer

    cfg, model, tok, engine = _vllm(ctx)
    close_engines()
    trainer = GRPOTrainer(cfg, model, tok, generate(40, seed=0), total_steps=2)
    history = trainer.train(2, progress=False)
    last = history[-1]
    close_engines()
    finite = all(math.isfinite(m[k]) for m in history for k in ("loss", "reward_mean", "grad_norm"))
    return {"ok": finite and "is/delta_abs_mean" in last, "is_delta_abs_mean": last.get("is/delta_abs_mean"),
            "is_weight_mean": last.get("is/weight_mean"), "step_time_s": last["step_time_s"],
            "lora_id": trainer.engine.lora_request.lora_int_id}


# -------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiers", default="AB", help="which tiers to run (default: AB)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_smoke.json"))
    args = parser.parse_args()
    from grpo.models import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        # head_dim 64 as Qwen2.5's; larger random weights, so outputs depend clearly on the adapter
        model_dir = build_tiny_model(Path(tmp) / "tiny", seed=0, hidden_size=256, num_layers=2, num_heads=4,
                                     num_kv_heads=2, intermediate_size=512, init_std=0.2)
        ctx = {"model_dir": model_dir, "tmp": tmp}
        device = torch.cuda.get_device_name(0) if _cuda() else f"cpu ({platform.processor() or platform.machine()})"
        results: dict[str, Any] = {"device": device, "torch": torch.__version__, "checks": {}}
        for tier, name, fn in CHECKS:
            if tier not in args.tiers:
                continue
            start = time.perf_counter()
            try:
                entry = {"status": "pass" if (out := fn(ctx)).pop("ok") else "fail", **out}
            except Skip as e:
                entry = {"status": "skip", "reason": str(e)}
            except Exception as e:  # noqa: BLE001 - a failed check is recorded, the others still run
                entry = {"status": "fail", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            entry["seconds"] = time.perf_counter() - start
            results["checks"][f"{tier}.{name}"] = entry
            print(f"{tier}.{name}: {entry['status']}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {args.out}")
    return int(any(c["status"] == "fail" for c in results["checks"].values()))


if __name__ == "__main__":
    raise SystemExit(main())
