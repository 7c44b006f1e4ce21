"""Writing the final model or adapter, gathered from every rank, and checking what was written."""
from __future__ import annotations

from pathlib import Path

from distributed_ft.errors import DftError


class SaveError(DftError):
    """The saved model is missing tensors or holds empty ones."""


def save_final_model(model, accelerator, strategy, tokenizer, out_dir: Path) -> Path:
    """Collective: gathers the full state dict (ZeRO-3 included) and writes it on the main process."""
    out_dir = Path(out_dir)
    state_dict = accelerator.get_state_dict(model)  # every rank takes part in the ZeRO-3 gather
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        if strategy.save is not None:
            strategy.save(unwrapped, str(out_dir), state_dict)
        else:
            unwrapped.save_pretrained(str(out_dir), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
        verify_saved(out_dir, unwrapped)
    accelerator.wait_for_everyone()
    return out_dir


def verify_saved(out_dir: Path, model) -> None:
    """Every saved tensor is non-empty and every trainable tensor made it to disk, under its own name."""
    from safetensors import safe_open

    files = sorted(Path(out_dir).glob("*.safetensors"))
    if not files:
        raise SaveError(f"no .safetensors file was written to {out_dir}")
    if list(Path(out_dir).glob("*.bin")) or list(Path(out_dir).glob("*.pt")):
        raise SaveError(f"{out_dir} holds pickle weight files; only safetensors are allowed")
    saved: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if handle.get_slice(key).get_shape() and 0 in handle.get_slice(key).get_shape():
                    raise SaveError(f"{file.name}: tensor '{key}' is empty (parameters were not gathered)")
                saved.add(key)
    for names in trained_tensor_names(model):
        if not names & saved:
            raise SaveError(f"{out_dir}: the trained tensor '{min(names)}' is missing from the saved files")


def trained_tensor_names(model) -> list[set[str]]:
    """For each trainable tensor, the names it can be saved under: a PEFT adapter's own key names, else
    every name of the parameter (tied weights are saved once, under any of theirs)."""
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        return [{key} for key in get_peft_model_state_dict(model)]
    names: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.requires_grad:
            names.setdefault(id(param), set()).add(name)
    return list(names.values())
