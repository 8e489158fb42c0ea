"""TRL's GRPOTrainer on the benchmark workload; prints one JSON line with seconds per step and phases.

    python benchmarks/trl_step.py --model artifacts/bench/tiny --prompts 10 --group 8 \\
        --new-tokens 64 --lora-r 16 --lora-alpha 64 --beta 0.04 --lr 1e-4 --steps 5 --warmup 1

Needs the `bench` extra (trl). The workload matches benchmarks/grpo_step.py: B prompts x G
completions of exactly T new tokens (`min_new_tokens = max_new_tokens = T`, so no stop token can end
a completion early), LoRA on all seven projections, beta > 0 with the reference = the base model
(adapter disabled, TRL's default for a fresh adapter), one optimizer step per batch, float32, no
gradient checkpointing, CPU.

Step time is `on_step_begin` -> `on_step_end` of a TrainerCallback. In TRL, generation happens inside
the training step (`_prepare_inputs`), so that span covers generation, scoring, the reference pass,
forward, backward and the optimizer step. Phases are timed by wrapping trainer methods on the
instance (best effort; each wrapper says what it covers).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    args = common.build_parser("TRL GRPOTrainer step benchmark").parse_args(argv)
    common.check_args(args)

    import datasets
    import torch
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    B, G, T = args.prompts, args.group, args.new_tokens
    total_steps = args.warmup + args.steps

    # One row per prompt, in step order; shuffle_dataset=False makes step k use rows k*B .. k*B+B-1,
    # the same prompts grpo_step.py uses at step k.
    per_step = common.workload_prompts(total_steps, B, args.seed)
    dataset = datasets.Dataset.from_dict({"prompt": [p for batch in per_step for p in batch]})

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    out_dir = tempfile.TemporaryDirectory(prefix="trl-bench-")  # nothing is saved; removed at the end
    config = GRPOConfig(
        output_dir=out_dir.name,
        per_device_train_batch_size=B * G,  # completions per step (TRL counts sequences, not prompts)
        num_generations=G,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        max_steps=total_steps,
        max_completion_length=T,
        generation_kwargs={"min_new_tokens": T},  # stop tokens suppressed until T tokens exist
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=args.beta,
        loss_type="grpo",
        scale_rewards="group",
        epsilon=0.2,
        mask_truncated_completions=False,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        use_vllm=False,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        shuffle_dataset=False,
        seed=args.seed,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        log_completions=False,
    )
    peft_config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=list(common.LORA_TARGETS),
        task_type="CAUSAL_LM",
    )

    clock = common.PhaseClock()
    completion_tokens: list[int] = []
    marks: dict[str, float] = {}

    class StepTimer(TrainerCallback):
        """Step wall time, and the optimizer phase: end of backward -> end of step (clip + step + zero_grad)."""

        def on_step_begin(self, args_: Any, state: Any, control: Any, **kwargs: Any) -> None:
            marks["step_begin"] = time.perf_counter()
            marks["step_begin_cpu"] = time.process_time()

        def on_step_end(self, args_: Any, state: Any, control: Any, **kwargs: Any) -> None:
            now = time.perf_counter()
            clock.add("optimizer", now - marks.pop("backward_end", now))
            clock.close_step(now - marks.pop("step_begin"), time.process_time() - marks.pop("step_begin_cpu"))

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[common.length_reward],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[StepTimer()],
    )

    # generation: TRL's `_generate` = tokenize prompts, pad, model.generate, mask after EOS, decode,
    # completion-length metrics (the counterpart of our generator's .generate).
    trainer._generate = clock.timed("generation", trainer._generate)

    # generation/hf_generate (a part of generation): the transformers `generate` call alone.
    # `unwrap_model_for_generation` yields this same PeftModel object on one CPU process.
    peft_generate = trainer.model.generate

    def timed_generate(*a: Any, **kw: Any) -> torch.Tensor:
        with clock.phase("generation/hf_generate"):
            out = peft_generate(*a, **kw)  # (N, P+T)
        completion_tokens.append(out.shape[0] * (out.shape[1] - kw["input_ids"].shape[1]))
        return out

    trainer.model.generate = timed_generate

    # reward: the reward functions and their gathering.
    trainer._calculate_rewards = clock.timed("reward", trainer._calculate_rewards)

    # reference: log-prob passes run under no_grad. With beta > 0 and generation aligned with the
    # optimizer step, the only such pass is the reference (adapter disabled); no old-logp pass runs.
    # The grad-enabled pass is the policy forward, counted in `forward` below.
    logps_fn = trainer._get_per_token_logps_and_entropies

    def timed_logps(*a: Any, **kw: Any) -> Any:
        name = "forward/logprobs" if torch.is_grad_enabled() else "reference"
        with clock.phase(name):
            return logps_fn(*a, **kw)

    trainer._get_per_token_logps_and_entropies = timed_logps

    # forward: compute_loss = policy forward with grad (log-probs + entropy) and the loss.
    trainer.compute_loss = clock.timed("forward", trainer.compute_loss)

    # backward: accelerator.backward(loss); its end starts the optimizer phase.
    accel_backward = trainer.accelerator.backward

    def timed_backward(*a: Any, **kw: Any) -> Any:
        with clock.phase("backward"):
            out = accel_backward(*a, **kw)
        marks["backward_end"] = time.perf_counter()
        return out

    trainer.accelerator.backward = timed_backward

    t0 = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t0
    out_dir.cleanup()

    if len(clock.step_seconds) != total_steps:
        sys.exit(f"error: expected {total_steps} steps, timed {len(clock.step_seconds)}")
    expected = B * G * T
    if any(n != expected for n in completion_tokens):
        sys.exit(f"error: completions were not exactly {T} tokens: {completion_tokens} (expected {expected}/step)")

    params, trainable = common.count_params(trainer.model)
    base_params = params - trainable
    result = common.summarize(
        library="trl",
        version=trl.__version__,
        args=args,
        clock=clock,
        completion_tokens=completion_tokens,
        params=base_params,
        trainable_params=trainable,
        extra={"train_seconds_total": train_seconds},
    )
    common.emit_result(result)


if __name__ == "__main__":
    main()
