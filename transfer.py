"""Entry point: ``python transfer.py ...`` or ``torchrun --nproc_per_node N transfer.py --num_gpus N ...``."""

import sys

from transfer.cli import main

if __name__ == "__main__":
    sys.exit(main())
