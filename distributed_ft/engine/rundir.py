"""The run directory: refuse to clobber an earlier run, then create it with the resolved config."""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from distributed_ft.errors import ConfigError
from distributed_ft.strategies.common import numel
from distributed_ft.strict import config_hash, config_to_dict


def check_run_dir(config) -> Path:
    """Checked before anything is written: an existing run is continued or replaced only on request."""
    run_dir = Path(config.output.dir)
    resuming = config.training.resume_from is not None
    if run_dir.exists() and any(run_dir.iterdir()) and not (resuming or config.output.overwrite):
        raise ConfigError(f"output.dir {run_dir} already holds a run; set training.resume_from=latest "
                          f"to continue it or output.overwrite=true to replace it")
    return run_dir


def create_run_dir(accelerator, config, config_path: str, kind: str = "run") -> Path:
    """Collective: the main process (re)creates the folder and writes the resolved config."""
    run_dir = Path(config.output.dir)
    if accelerator.is_main_process:
        if config.output.overwrite and config.training.resume_from is None and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        header = f"# resolved {kind} config of {config_path} (hash {config_hash(config)})\n"
        (run_dir / "config.yaml").write_text(header + yaml.safe_dump(config_to_dict(config), sort_keys=False))
    accelerator.wait_for_everyone()
    return run_dir


def record_rank(accelerator, run_dir: Path, modules, **extra) -> dict:
    """Each rank writes what it holds (ranks/rank-N.json): proof of the topology and of ZeRO-3 sharding."""
    import json

    from distributed_ft.engine.distributed import zero_stage

    params = [p for module in modules for p in module.parameters()]
    info = {"rank": accelerator.process_index, "world_size": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type), "zero_stage": zero_stage(accelerator),
            "local_parameters": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params),
            "total_parameters": sum(numel(p) for p in params), **extra}
    folder = Path(run_dir) / "ranks"
    folder.mkdir(exist_ok=True)
    (folder / f"rank-{accelerator.process_index}.json").write_text(json.dumps(info))
    return info
