"""`python -m trainer.segment`: the command of trainer.finetune.segment, kept at its documented name."""
import sys

from .finetune.segment import main

if __name__ == "__main__":
    sys.exit(main())
