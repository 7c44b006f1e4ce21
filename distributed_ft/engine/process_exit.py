"""How a launched rank leaves the process once its work is done."""
from __future__ import annotations

import logging
import os
import sys


def launched_as_rank() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def exit_process(code: int) -> None:
    """Exit with `code`; a launched rank skips interpreter finalization (flushing its output first).

    Call it when the rank's collectives are over, its process groups destroyed and its outputs written: native
    teardown during finalization (gloo worker threads, DeepSpeed ops) can still abort a rank at that point and
    turn a job whose work is complete into a failed one.
    """
    if launched_as_rank():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
