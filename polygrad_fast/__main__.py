"""``python -m polygrad_fast SUBCOMMAND ...``: the ``polygrad-fast`` command line, also the module torchrun runs.

    torchrun --standalone --nproc_per_node 2 -m polygrad_fast train --preset debug --logdir runs/ddp

Under torchrun (``TORCHELASTIC_ERROR_FILE`` set) the entry is wrapped in torch's ``record``, so the exception of
a failing rank is written where torchrun reports it as the run's root cause.
"""
import os
import sys

from .cli import main

if __name__ == "__main__":
    if "TORCHELASTIC_ERROR_FILE" in os.environ:
        from torch.distributed.elastic.multiprocessing.errors import record

        main = record(main)
    sys.exit(main())
