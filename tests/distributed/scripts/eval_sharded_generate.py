"""Run sharded generation + evaluation of a tiny Llama under whatever `accelerate launch` set up.

Writes (on the main process) a JSON with the predictions, the metrics, the process count and, under
DeepSpeed ZeRO-3, how many times the parameters were gathered.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_tiny_llama import PROMPTS, REFERENCES, build_tiny_llama  # noqa: E402
from distributed_ft.engine.process_exit import exit_process


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=3)
    args = parser.parse_args()

    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from distributed_ft.eval import EvalConfig, evaluate
    from distributed_ft.eval.generate import generate_predictions

    if not (Path(args.model_dir) / "config.json").exists():
        build_tiny_llama(args.model_dir)  # built by the single-process run before any multi-process one
    # DeepSpeed on CPU needs an explicit gloo group; a plain one-process run must not ask for one.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if launched else [])
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.model_dir)
    model = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)

    gathers = {"count": 0}
    zero3 = accelerator.state.deepspeed_plugin is not None and accelerator.state.deepspeed_plugin.zero_stage == 3
    if accelerator.state.deepspeed_plugin is not None:
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        model, _ = accelerator.prepare(model, optimizer)
        import deepspeed

        original = deepspeed.zero.GatheredParameters

        def counting(*a, **kw):  # count full-parameter gathers to check one per generation batch
            gathers["count"] += 1
            return original(*a, **kw)

        deepspeed.zero.GatheredParameters = counting
    else:
        model = accelerator.prepare(model)

    cfg = EvalConfig(batch_size=args.batch_size, max_new_tokens=6,
                     metrics={"story": ["exact_match", "bleu", "rouge", "perplexity"]})
    predictions = generate_predictions(model, tokenizer, PROMPTS, accelerator, cfg)
    generate_gathers = gathers["count"]
    records = [{"task": "story", "prompt": p, "reference": r} for p, r in zip(PROMPTS, REFERENCES)]
    result = evaluate(model, tokenizer, records, accelerator, cfg, {"story": "generation"})
    payload = {
        "num_processes": accelerator.num_processes,
        "zero3": zero3,
        "generate_gathers": generate_gathers,
        "predictions": predictions,
        "rank_predictions_equal": None,
        "eval_predictions": [row["prediction"] for row in result.predictions],
        "scores": result.tasks["story"].scores,
        "signatures": result.signatures,
    }
    # every rank must hold the same full list and the same result
    from accelerate.utils import gather_object

    everyone = gather_object([(predictions, result.tasks["story"].scores)]) if accelerator.num_processes > 1 \
        else [(predictions, result.tasks["story"].scores)]
    payload["rank_predictions_equal"] = all(item == everyone[0] for item in everyone)
    if accelerator.is_main_process:
        Path(args.out).write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
    exit_process(0)
