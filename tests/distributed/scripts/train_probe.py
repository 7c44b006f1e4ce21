"""Train through SFTRun (the code path of `dft train`), then record the in-memory model's logits
on a fixed probe batch before saving, so a test can compare them with the reloaded files.

Usage: [accelerate launch ...] train_probe.py CONFIG [key=value ...]
"""
import json
import sys

import torch

from distributed_ft.recipes.sft import SFTRun
from distributed_ft.engine.process_exit import exit_process

PROBE = [[5, 17, 42, 9, 33, 2, 11, 27], [8, 3, 3, 60, 14, 19, 7, 1]]


def main() -> None:
    run = SFTRun(sys.argv[1], sys.argv[2:]).build()
    run.train()
    model = run.model
    model.eval()
    with torch.no_grad():  # every rank runs the forward: ZeRO-3 gathers parameters collectively
        logits = model(input_ids=torch.tensor(PROBE, device=run.accelerator.device)).logits
    final = run.save()
    if run.accelerator.is_main_process:
        (run.run_dir / "probe.json").write_text(json.dumps({"input_ids": PROBE, "logits": logits.float().tolist(),
                                                            "final": str(final)}))
    run.close()


if __name__ == "__main__":
    main()
    exit_process(0)
