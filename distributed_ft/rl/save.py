"""Saving an RL run's policy (model or adapter, as its strategy saves it) and PPO's value head."""
from __future__ import annotations

from pathlib import Path

VALUE_FILE = "value_head.safetensors"


def save_policy(model, accelerator, strategy, tokenizer, out_dir: Path) -> Path:
    """Collective: gathers the wrapper's state (ZeRO-3 included); writes the policy and the critic on rank 0."""
    from safetensors.torch import save_file

    from distributed_ft.engine.save import verify_saved

    out_dir = Path(out_dir)
    state = accelerator.get_state_dict(model)
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        policy_state = {k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")}
        critic_state = {k: v.contiguous() for k, v in state.items() if not k.startswith("policy.")}
        if strategy.save is not None:
            strategy.save(unwrapped.policy, str(out_dir), policy_state)
        else:
            unwrapped.policy.save_pretrained(str(out_dir), state_dict=policy_state, safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
        verify_saved(out_dir, unwrapped.policy)
        if critic_state:  # PPO's value head (and separate critic); the critic-free algorithms have none
            (out_dir / "critic").mkdir(exist_ok=True)
            save_file(critic_state, str(out_dir / "critic" / VALUE_FILE))
    accelerator.wait_for_everyone()
    return out_dir
