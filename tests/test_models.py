"""Tiny model build, tokenizer, loading errors, LoRA attachment and the base-model cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo.config import LORA_TARGETS, ModelConfig, RunConfig
from grpo.errors import ConfigError, ModelLoadError
from grpo.models import (
    PolicyCache,
    attach_lora,
    build_tiny_model,
    cached_policy,
    ensure_base_model,
    load_base_model,
    load_policy,
    load_tokenizer,
    policy_key,
    resolve_device,
    stop_token_ids,
    tiny_corpus,
)

TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="module")
def tok(tiny: Path):
    return load_tokenizer(str(tiny))


def run_cfg(path: Path | str, **model: object) -> RunConfig:
    return RunConfig.model_validate({"model": {"name_or_path": str(path), **model}})


def test_auto_classes_load_the_build(tiny: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny)
    tok = AutoTokenizer.from_pretrained(tiny)
    cfg = model.config
    assert cfg.model_type == "qwen2" and type(model).__name__ == "Qwen2ForCausalLM"
    assert cfg.vocab_size == len(tok) and 400 <= len(tok) <= 512
    assert cfg.max_position_embeddings == 1024 and cfg.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (128, 4, 4, 2)
    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.padding_side == "left"
    assert model.generation_config.pad_token_id == eot
    assert set(model.generation_config.eos_token_id) == {im_end, eot}
    # a forward pass works and gives one distribution per position
    ids = tok("nums: 1 2 3 target: 6", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


def test_same_seed_same_bytes_other_seed_other_weights(tiny: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (tiny / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (tiny / "model.safetensors").read_bytes()


def test_rebuild_replaces_folder_and_leaves_no_temp_dirs(tmp_path: Path) -> None:
    out = tmp_path / "m"
    build_tiny_model(out, seed=0, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    (out / "stale.txt").write_text("old")
    build_tiny_model(out, seed=0, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 32


@pytest.mark.parametrize(
    "text",
    [
        "nums: 93 4 68 target: 29",
        "93+4=97,97-68=29</think>\n<answer>(93+4)-68</answer>",
        " Let me solve this step by step.\n<think>  two  spaces\n\nand blank lines \n",
        "Using each number in this list only once [93, 4, 68], create an equation that equals 29.",
        "<answer>(1 + 2) / 3</answer>",
    ],
)
def test_decode_encode_round_trip(tok, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_loaded_tokenizer_encodes_like_saved_tokenizer_json(tiny: Path, tok) -> None:
    from tokenizers import Tokenizer

    saved = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    for line in tiny_corpus(seed=123, num_problems=100) + ["<think>1 + 2</think>\n<answer>3</answer>"]:
        assert tok.encode(line, add_special_tokens=False) == saved.encode(line).ids, line


def test_digits_are_single_tokens(tok) -> None:
    pieces = tok.convert_ids_to_tokens(tok.encode("12345 + 678", add_special_tokens=False))
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digits == list("12345678")


def test_special_and_tag_tokens_are_single_ids(tok) -> None:
    for t in SPECIALS + TAGS:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [t]
    text = "<|im_start|>assistant\n<think>x</think>\n<answer>1+2</answer><|im_end|><|endoftext|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>x</think>\n<answer>1+2</answer>"
    assert tok.decode(ids) == text


def test_chat_template_chatml_and_continued_prefill(tok) -> None:
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "nums: 93 4 68 target: 29"},
        {"role": "assistant", "content": "<think>"},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert rendered == (
        "<|im_start|>system\nsys<|im_end|>\n"
        "<|im_start|>user\nnums: 93 4 68 target: 29<|im_end|>\n"
        "<|im_start|>assistant\n<think>"
    )
    gen_prompt = tok.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert gen_prompt == "<|im_start|>user\nnums: 93 4 68 target: 29<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(rendered, add_special_tokens=False)
    assert ids[-1] == tok.convert_tokens_to_ids("<think>")


def test_stop_token_ids(tok) -> None:
    ids = stop_token_ids(tok)
    assert ids[0] == tok.eos_token_id
    assert set(ids) == {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}


def test_load_base_model_frozen_eval_dtype(tiny: Path) -> None:
    model = load_base_model(ModelConfig(name_or_path=str(tiny), device="cpu", dtype="bfloat16"))
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert resolve_device(ModelConfig(device="cpu")) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_cuda_without_gpu_is_config_error() -> None:
    with pytest.raises(ConfigError, match="model.device"):
        resolve_device(ModelConfig(device="cuda"))


def test_attach_lora_trains_only_adapter(tiny: Path) -> None:
    cfg = run_cfg(tiny)
    model = attach_lora(load_base_model(cfg.model), cfg.lora)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert frozen and not any("lora_" in n for n in frozen)
    # A and B for every target projection of every layer
    assert len(trainable) == 2 * len(LORA_TARGETS) * model.config.num_hidden_layers
    assert model.peft_config["default"].r == cfg.lora.r
    assert model.peft_config["default"].lora_alpha == cfg.lora.alpha


def test_bogus_hub_id_offline_is_one_line_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    bogus = "no-such-org/no-such-model-xyz"
    with pytest.raises(ModelLoadError) as err:
        load_base_model(ModelConfig(name_or_path=bogus, device="cpu"))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == (
        f"model.name_or_path: cannot load '{bogus}' (not a local folder and not in the Hugging Face "
        "cache; offline). Pass a local folder, e.g. model.name_or_path=artifacts/tiny-model"
    )
    with pytest.raises(ModelLoadError, match="model.name_or_path: cannot load"):
        load_tokenizer(bogus)


def test_ensure_base_model(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ensure_base_model(ModelConfig(name_or_path=str(tiny))) == str(tiny)
    assert ensure_base_model(ModelConfig(name_or_path="Qwen/Qwen2.5-0.5B")) == "Qwen/Qwen2.5-0.5B"
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(ModelLoadError, match="build_tiny_if_missing"):
        ensure_base_model(ModelConfig(name_or_path=str(missing), build_tiny_if_missing=False))
    assert not missing.exists()
    # the default relative path is built in the working directory, with the configured shape
    monkeypatch.chdir(tmp_path)
    tiny_shape = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}
    got = ensure_base_model(ModelConfig(tiny=tiny_shape))
    assert got == "artifacts/tiny-model"
    cfg = AutoModelForCausalLM.from_pretrained(tmp_path / got).config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (32, 1, 64)


def test_load_policy_adapter_round_trip(tiny: Path, tmp_path: Path) -> None:
    cfg = run_cfg(tiny, device="cpu")
    model, tok = load_policy(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    loaded, tok2 = load_policy(cfg, str(tmp_path / "adapter"))
    assert tok2.pad_token == tok.pad_token and tok2.padding_side == "left"
    want = {n: p for n, p in model.named_parameters() if "lora_" in n}
    got = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert want.keys() == got.keys() and want
    for n in want:
        assert torch.equal(want[n], got[n]), n
        assert got[n].requires_grad, n
    ids = tok("nums: 1 2 3 target: 6", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model.eval()
        loaded.eval()
        torch.testing.assert_close(model(ids).logits, loaded(ids).logits)
        with loaded.disable_adapter():
            assert not torch.allclose(loaded(ids).logits, model(ids).logits)


def test_load_policy_bad_adapter_dir(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="adapter_dir"):
        load_policy(run_cfg(tiny, device="cpu"), str(tmp_path / "empty"))


def test_policy_cache_holds_one_policy(tiny: Path, tmp_path: Path) -> None:
    from grpo.checkpoint import save_checkpoint

    cfg = RunConfig.model_validate({"model": {"name_or_path": str(tiny), "device": "cpu"}})
    cache = PolicyCache()
    fresh, tok = cached_policy(cfg, None, cache)
    assert cached_policy(cfg, None, cache) == (fresh, tok)  # same key: the same objects
    with torch.no_grad():
        next(p for n, p in fresh.named_parameters() if "lora_B" in n).add_(1.0)
    ckpt = save_checkpoint(tmp_path / "step-000001", model=fresh, tokenizer=tok, optimizer=None, scheduler=None,
                           state={"step": 1})
    loaded, _ = cached_policy(cfg, ckpt, cache)  # another key replaces the entry, loaded from disk
    assert loaded is not fresh and cache.get(policy_key(cfg, None)) is None
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), loaded.state_dict().values()))
    assert cache.take(policy_key(cfg, ckpt))[0] is loaded and cache.get(policy_key(cfg, ckpt)) is None
