"""`python -m grpo_pipeline ...` is the `grpo` command (see `grpo_pipeline.cli`)."""

import sys

from grpo_pipeline.cli import entry

sys.exit(entry())
