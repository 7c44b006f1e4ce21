"""One RL update (PPO, or the GRPO family for a grpo config) from a fixed, hand-made batch of rollouts; rank 0
writes the parameter change, the advantages of the whole batch and the update's statistics.

Run under any launcher: `python ppo_update_probe.py CONFIG OUT key=value ...`. Every launch sees the same
global batch (prompts, responses, scores; one sample unscorable) and takes its own rank's slice of it (whole
groups: consecutive samples of one prompt stay on one rank).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from distributed_ft.engine.process_exit import exit_process


def main() -> None:
    from safetensors.torch import save_file

    from distributed_ft.grader.results import GradeResult
    from distributed_ft.recipes.grpo import GRPORun
    from distributed_ft.recipes.ppo import PPORun
    from distributed_ft.rl.rollout import Rollout, encode_queries, response_mask

    config, out, *overrides = sys.argv[1:]
    out = Path(out)
    recipe = GRPORun if "/grpo/" in config else PPORun
    run = recipe(config, [f"output.dir={out}", *overrides]).build().prepare_model()
    trainer = run.make_trainer(grader=None)
    acc, ppo = run.accelerator, run.section
    n = ppo.rollout_batch_size * ppo.num_generations
    g = torch.Generator().manual_seed(1234)
    prompts = [p["prompt"] for p in run.prompts.train[:ppo.rollout_batch_size] for _ in range(ppo.num_generations)]
    query, query_mask = encode_queries(run.tokenizer, prompts)  # padded over the global batch: same widths
    response = torch.randint(5, len(run.tokenizer), (n, ppo.max_new_tokens), generator=g)
    for row in range(0, n, 3):  # some responses stop early
        response[row, 2 + row % (ppo.max_new_tokens - 2)] = run.tokenizer.eos_token_id
    mask = response_mask(response, run.tokenizer.eos_token_id)
    response = torch.where(mask > 0, response, torch.full_like(response, run.tokenizer.pad_token_id))
    scores = torch.rand(n, generator=g).tolist()
    results = [GradeResult(reward=None if i == 5 else s, sub_rewards={}, error=None if i != 5 else "down")
               for i, s in enumerate(scores)]
    share = n // acc.num_processes
    sl = slice(acc.process_index * share, (acc.process_index + 1) * share)
    ro = Rollout(query[sl], query_mask[sl], response[sl], mask[sl], ["x"] * share, [{}] * share, prompts[sl])
    before = acc.get_state_dict(run.model)
    before = {k: v.detach().clone().float() for k, v in (before or {}).items()}
    trainer._score(ro)
    trainer.apply_grades(ro, results[sl])
    adv = trainer.advantages(ro)
    advantages = acc.gather(adv["advantages"].to(acc.device)).cpu()
    stats = trainer.update(ro, adv, step=0)
    after = acc.get_state_dict(run.model)
    if acc.is_main_process:
        delta = {k: (after[k].float() - before[k]).contiguous() for k in before}
        delta["probe.advantages"] = advantages.contiguous()
        save_file(delta, str(out / "delta.safetensors"))
        (out / "probe.json").write_text(json.dumps({"stats": stats, "world": acc.num_processes}))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main()
    exit_process(0)
