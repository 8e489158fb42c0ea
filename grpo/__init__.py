"""grpo: group relative policy optimisation of LoRA adapters on tasks with verifiable rewards.

A pure library: no Prefect import anywhere in it. The Prefect tasks in `tasks/` and flows in
`flows/` call it; so do the CLI (`grpo --help`) and the tests.
"""

__version__ = "0.1.0"
