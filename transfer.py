"""Entry point: ``python transfer.py ...`` or ``torchrun --nproc_per_node N transfer.py --num_gpus N ...``."""

import sys

from transfer.errors import Terminated, raise_on_stop_signals

if __name__ == "__main__":
    raise_on_stop_signals()  # before the imports below: Ctrl-C at any moment ends with one line, not a traceback
    try:
        from transfer.cli import main
    except Terminated as stop:
        print(f"transfer.py: stopped by {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    sys.exit(main())
