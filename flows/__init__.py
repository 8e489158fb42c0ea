"""Prefect flows that only sequence the tasks of `tasks/`: `finetune` (grpo-finetune) and
`promote` (grpo-promote), installed as `grpo_pipeline.flows`. Run them with `grpo run` /
`grpo promote`, from Python (`from grpo_pipeline.flows.finetune import finetune`;
`finetune(config=RunConfig())`), or through a deployment (the run config is the flow parameter,
shown as a form in the Prefect UI)."""
