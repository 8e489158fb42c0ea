"""`python -m grpo ...` is the `grpo` command (see `grpo.cli`)."""

import sys

from grpo.cli import main

sys.exit(main())
