"""`python -m trainer.detect`: the command of trainer.finetune.detect, kept at its documented name."""
import sys

from .finetune.detect import main

if __name__ == "__main__":
    sys.exit(main())
