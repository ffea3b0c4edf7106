"""`python -m trainer.depth`: the command of trainer.finetune.depth, kept at its documented name."""
import sys

from .finetune.depth import main

if __name__ == "__main__":
    sys.exit(main())
