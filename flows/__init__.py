"""Prefect flows that only sequence the tasks of `tasks/`: `finetune` (grpo-finetune), `promote`
(grpo-promote) and `sweep` (grpo-sweep), installed as `grpo_pipeline.flows`. Run them with
`grpo run` / `grpo promote` / `grpo sweep`, from Python (`from grpo_pipeline.flows.finetune import finetune`;
`finetune(config=RunConfig())`), or through a deployment (the run config is the flow parameter,
shown as a form in the Prefect UI)."""
