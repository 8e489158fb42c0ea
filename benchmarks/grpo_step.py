"""This project's GRPO step on the benchmark workload; prints one JSON line with seconds per step and phases.

    python benchmarks/grpo_step.py --model artifacts/bench/tiny --prompts 10 --group 8 \\
        --new-tokens 64 --lora-r 16 --lora-alpha 64 --beta 0.04 --lr 1e-4 --steps 5 --warmup 1

It runs `grpo.trainer.GRPOTrainer.step` itself (the code a pipeline run executes), with the
workload of benchmarks/trl_step.py: B prompts x G completions of exactly T new tokens
(`generation.min_new_tokens = max_new_tokens = T`), LoRA on all seven projections, beta > 0 with
the reference = the base model (adapter disabled), one optimizer step per batch
(num_iterations = 1), float32, CPU. Only the prompts differ from a pipeline run: the benchmark's
plain strings instead of chat-templated Countdown prompts, so both libraries see identical text.
Phases come from the trainer's own metrics (`time/*_s`): generation, reward, reference, forward,
backward, optimizer, sync. `--plain` turns the fast path off (the Hugging Face path).

Not the paper's reward: a cheap length score shared with the TRL side (benchmarks/common.py).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

# trainer metric -> benchmark phase
PHASE_OF = {
    "time/generation_s": "generation", "time/score_s": "reward", "time/reference_s": "reference",
    "time/forward_s": "forward", "time/backward_s": "backward", "time/optimizer_s": "optimizer",
    "time/sync_s": "sync",
}


def main(argv: list[str] | None = None) -> None:
    parser = common.build_parser("grpo-pipeline GRPO step benchmark")
    parser.add_argument(
        "--micro-batch-size", type=int, default=0,
        help="Sequences per forward/backward (0 = all N = B*G at once, as TRL's default here).",
    )
    parser.add_argument("--plain", action="store_true", help="The hf engine (not cpu_fast).")
    args = parser.parse_args(argv)
    common.check_args(args)

    import torch

    import grpo
    from grpo.config import load_config
    from grpo.models import load_policy
    from grpo.trainer import Batch, GRPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    B, G, T = args.prompts, args.group, args.new_tokens
    micro = args.micro_batch_size or B * G
    total_steps = args.warmup + args.steps
    per_step = common.workload_prompts(total_steps, B, args.seed)
    cfg = load_config(None, [
        f"model.name_or_path={args.model}", "model.build_tiny_if_missing=false", "model.device=cpu",
        f"lora.r={args.lora_r}", f"lora.alpha={args.lora_alpha}", f"lora.dropout={args.lora_dropout}",
        f"train.prompts_per_step={B}", f"train.group_size={G}", f"train.micro_batch_size={micro}",
        f"train.beta={args.beta}", f"train.learning_rate={args.lr}", f"train.seed={args.seed}",
        f"generation.max_new_tokens={T}", f"generation.min_new_tokens={T}",
        f"generation.fast_path={not args.plain}",
    ])
    model, tokenizer = load_policy(cfg)

    class WorkloadTrainer(GRPOTrainer):
        def next_batch(self, k: int = 0) -> Batch:  # the benchmark's plain prompts, identical on both sides
            return Batch(list(range(B)), per_step[self.step_count], {})

    trainer = WorkloadTrainer(
        cfg, model, tokenizer, None, reward_fns=[("length", common.length_reward)], total_steps=total_steps
    )
    clock = common.PhaseClock()
    completion_tokens: list[int] = []
    for _ in per_step:
        c0 = time.process_time()
        metrics = trainer.step()
        for key, phase in PHASE_OF.items():
            clock.add(phase, metrics.get(key, 0.0))
        clock.close_step(metrics["step_time_s"], time.process_time() - c0)
        completion_tokens.append(round(metrics["completion_length_mean"] * B * G))

    expected = B * G * T
    if any(n != expected for n in completion_tokens):
        sys.exit(f"error: completions were not exactly {T} tokens: {completion_tokens} (expected {expected}/step)")

    total, trainable = common.count_params(model)
    result = common.summarize(
        library="grpo-pipeline" + (" (plain)" if args.plain else ""),
        version=getattr(grpo, "__version__", "0.1.0"),
        args=args,
        clock=clock,
        completion_tokens=completion_tokens,
        params=total - trainable,
        trainable_params=trainable,
        extra={"micro_batch_size": micro, "engine": trainer.engine.name},
    )
    common.emit_result(result)


if __name__ == "__main__":
    main()
