"""grpo_pipeline: the application around the `grpo` library: the `grpo` command (`cli`), the
Prefect tasks (`grpo_pipeline.tasks`, the repository's `tasks/`), flows (`grpo_pipeline.flows`,
`flows/`) and deployments (`grpo_pipeline.deployments`, `deployments/`).

The layers import downwards only: cli -> flows -> tasks -> grpo. `grpo` imports none of them
and no Prefect (docs/architecture.md).
"""
