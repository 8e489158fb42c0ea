"""Tests of the supervised warm start (grpo.sft): solver-written completions, label masking,
seeded training, atomic saving, and a shortened warm start that learns the format and some
arithmetic. Run: `pytest -q tests/test_sft.py` (the learning test takes well under a minute on
2 idle cores; longer when the CPU is shared).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from grpo.config import Conversation, ModelConfig, RunConfig
from grpo.countdown import build_prompt, generate, prepare_splits, solve_steps
from grpo.envs.countdown.solver import completion_text, expression_from_steps
from grpo.evaluate import evaluate
from grpo.models import attach_lora, load_base_model, load_tokenizer
from grpo.rewards import equation_reward, format_reward, safe_eval_exact
from grpo.sft import IGNORE_INDEX, build_examples, collate, save_sft, train_sft

# The shortened warm start of `test_short_warm_start_learns`: a step budget (not a time budget),
# so the result does not depend on how busy the CPU is, only the duration does (~45 s at ~10k
# tokens/s). On 3-number problems with numbers 1-10 it reached accuracy 0.17 (0.07 after 250
# steps, 0.015 after 200) and format 1.0; on the default problems (3-4 numbers in 1-99) the tiny
# model needs ~1.2M tokens (~2 minutes) before its first correct answers.
SHORT_SFT = {"max_steps": 300, "batch_size": 32, "learning_rate": 3e-3, "warmup_steps": 10, "seed": 0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rows_scores(rows) -> tuple[list[float], list[float]]:
    texts = [completion_text(r["nums"], r["target"]) for r in rows]
    fmt = format_reward(texts)
    eq = equation_reward(texts, target=list(rows["target"]), nums=list(rows["nums"]))
    return fmt, eq


def _cfg(model_dir: Path, **sft) -> RunConfig:
    cfg = RunConfig()
    cfg.model.name_or_path = str(model_dir)
    cfg.model.device = "cpu"
    for k, v in sft.items():
        setattr(cfg.sft, k, v)
    return cfg


def _load(model_dir: Path):
    mc = ModelConfig(name_or_path=str(model_dir), build_tiny_if_missing=False, device="cpu")
    return load_base_model(mc), load_tokenizer(str(model_dir))


# ------------------------------------------------------------------------------- completions


def test_completion_text_example():
    assert completion_text([93, 4, 68], 29) == "93+4=97,97-68=29</think>\n<answer>(93+4)-68</answer>"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 400, "seed": 11},
        {"n": 300, "seed": 12, "number_range": (1, 6)},  # many repeated numbers
        {"n": 200, "seed": 13, "num_count": (2, 5)},
    ],
)
def test_completion_text_scores_two(kwargs):
    rows = generate(**kwargs)
    fmt, eq = _rows_scores(rows)
    assert sum(f + e for f, e in zip(fmt, eq)) == 2.0 * len(rows)


def test_trace_steps_are_true_and_end_at_target():
    rows = generate(200, seed=21)
    for r in rows:
        text = completion_text(r["nums"], r["target"])
        trace = text.split("</think>")[0]
        results = []
        for step in trace.split(","):
            lhs, rhs = step.split("=")
            assert safe_eval_exact(lhs) == safe_eval_exact(rhs), step
            results.append(safe_eval_exact(rhs))
        assert results[-1] == r["target"]


def test_fractional_and_negative_solutions_score_two():
    cases = [([3, 3, 8, 8], 24), ([5, 5, 5], -4), ([1, 5, 5, 5], 24)]
    for nums, target in cases:
        text = completion_text(nums, target)
        assert format_reward([text]) == [1.0], text
        assert equation_reward([text], target=[target], nums=[nums]) == [1.0], text


def test_expression_from_steps_rejects_steps_that_do_not_match():
    with pytest.raises(ValueError):
        expression_from_steps([1, 2, 3], [(1, "+", 2, 3)])  # leaves two values
    with pytest.raises(ValueError):
        expression_from_steps([1, 2], [(1, "+", 7, 8)])  # 7 is not available
    with pytest.raises(ValueError):
        completion_text([1, 1], 97)


# -------------------------------------------------------------------------------- examples


def test_labels_mask_prompt_tokens(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    conv = Conversation()
    rows = generate(20, seed=3).to_list() + [{"nums": [1, 1], "target": 97}]
    assert solve_steps([1, 1], 97) is None
    examples = build_examples(rows, tok, conv)
    assert len(examples) == 20  # the unsolvable row is skipped
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    for ex, r in zip(examples, rows):
        prompt_ids = tok(build_prompt(tok, r["nums"], r["target"], conv), add_special_tokens=False)["input_ids"]
        p = len(prompt_ids)
        ids, labels = ex["input_ids"], ex["labels"]
        assert ids[:p] == prompt_ids
        assert labels[:p] == [IGNORE_INDEX] * p
        assert labels[p:] == ids[p:] and len(ids) > p
        assert ids[-1] == end_id
        assert tok.decode(ids[p:]) == completion_text(r["nums"], r["target"]) + "<|im_end|>"
    ids, labels = collate(examples[:4], tok.pad_token_id)
    lengths = [len(e["input_ids"]) for e in examples[:4]]
    assert ids.shape == (4, max(lengths))
    for i, n in enumerate(lengths):
        assert ids[i, :n].tolist() == examples[i]["input_ids"]
        assert (ids[i, n:] == tok.pad_token_id).all() and (labels[i, n:] == IGNORE_INDEX).all()


# -------------------------------------------------------------------------------- training


def test_same_seed_same_data_and_weights(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    a, b = generate(300, seed=5), generate(300, seed=5)
    assert a.to_list() == b.to_list()
    assert build_examples(a, tok, Conversation()) == build_examples(b, tok, Conversation())
    assert generate(300, seed=6).to_list() != a.to_list()

    def run(seed: int) -> tuple[list[torch.Tensor], list[dict]]:
        model, tok = _load(tiny_model_dir)
        log: list[dict] = []
        cfg = _cfg(tiny_model_dir, max_steps=4, batch_size=8, warmup_steps=2, learning_rate=1e-3, seed=seed)
        summary = train_sft(model, tok, a, cfg, on_step=log.append, progress=False)
        assert summary["steps"] == 4 and summary["stopped_by"] == "steps"
        return [p.detach().clone() for p in model.parameters()], log

    w1, log1 = run(0)
    w2, log2 = run(0)
    w3, _ = run(1)
    assert all(torch.equal(x, y) for x, y in zip(w1, w2))
    assert not all(torch.equal(x, y) for x, y in zip(w1, w3))
    assert [m["sft/loss"] for m in log1] == [m["sft/loss"] for m in log2]
    assert [m["step"] for m in log1] == [1, 2, 3, 4]
    assert set(log1[0]) == {"step", "sft/loss", "sft/tokens_per_s", "sft/lr"}
    lrs = [m["sft/lr"] for m in log1]
    assert lrs[0] == pytest.approx(1e-3 / 2 * 0.5 * (1 + torch.cos(torch.tensor(0.0)).item()))
    assert lrs[1] > lrs[2] > lrs[3] > 0  # cosine decay after the warmup
    assert all(m["sft/tokens_per_s"] > 0 for m in log1)


def test_time_budget_stops_training(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    cfg = _cfg(tiny_model_dir, max_steps=10_000, batch_size=8, max_minutes=0.02)
    t0 = time.perf_counter()
    summary = train_sft(model, tok, generate(200, seed=2), cfg, progress=False)
    assert summary["stopped_by"] == "time" and 1 <= summary["steps"] < 10_000
    assert time.perf_counter() - t0 < 30


def test_lora_trains_adapter_only_and_saves_merged_plain_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base, tok = _load(tiny_model_dir)
    cfg = _cfg(tiny_model_dir, max_steps=3, batch_size=8, learning_rate=1e-2, warmup_steps=0)
    model = attach_lora(base, cfg.lora)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    train_sft(model, tok, generate(100, seed=4), cfg, progress=False)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert any(not torch.equal(params[n], v) for n, v in lora.items())

    out = save_sft(model, tok, tmp_path / "sft")
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    assert hasattr(model, "peft_config")  # the caller's model still carries its adapter
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    model.eval()
    ids = torch.tensor([tok("nums: 1 2 3 target: 6")["input_ids"]])  # (1, L)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_save_replaces_atomically(tiny_model_dir, tmp_path):
    model, tok = _load(tiny_model_dir)
    out = tmp_path / "sft"
    save_sft(model, tok, out)
    first = (out / "model.safetensors").read_bytes()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_sft(model, tok, out)
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]  # no temporary folders left
    assert load_tokenizer(str(out)).get_vocab() == tok.get_vocab()


def test_short_warm_start_learns(tiny_model_dir, tmp_path):
    """A step-budgeted warm start reaches format > 0.9 and accuracy > 0 on held-out problems;
    the saved model gives the same evaluation numbers as the trained one."""
    splits = prepare_splits(generate(6000, seed=42, num_count=(3,), number_range=(1, 10)), None, 0.1, 42)
    model, tok = _load(tiny_model_dir)
    cfg = _cfg(tiny_model_dir, **SHORT_SFT)
    cfg.eval.num_problems = 200
    summary = train_sft(model, tok, splits["train"], cfg, progress=False)
    assert summary["steps"] == SHORT_SFT["max_steps"]
    before = evaluate(model, tok, splits["test"], cfg, progress=False)
    assert before.format_rate > 0.9, before.samples[:3]
    assert before.accuracy > 0, before.samples[:3]

    out = save_sft(model, tok, tmp_path / "sft")
    reloaded, tok2 = _load(out)
    again = evaluate(reloaded, tok2, splits["test"], _cfg(out, **SHORT_SFT).model_copy(
        update={"eval": cfg.eval}), progress=False)
    assert again.correct == before.correct
    assert (again.accuracy, again.format_rate, again.mean_reward) == (
        before.accuracy, before.format_rate, before.mean_reward)
    assert os.path.isdir(out)
