"""`python -m trainer [--config FILE] [key=value ...]`: the same as `instdisc train`, the
form a `ray job submit` entrypoint or a RayJob uses."""

import sys

from trainer.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
