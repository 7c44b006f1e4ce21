"""Building the Accelerator from the launch environment: DDP, DeepSpeed ZeRO 0-3 or one process.

The launcher (accelerate launch, torchrun, srun) decides the topology; the run config decides
batch sizes, accumulation, clipping and precision, and those values are written into DeepSpeed's
"auto" fields here so there is one source of truth for each setting.
"""
from __future__ import annotations

import os

from distributed_ft.engine.cpu_allocator import keep_freed_memory
from distributed_ft.engine.cpu_features import report_cpu_precision
from distributed_ft.engine.logging import setup_console_logging
from distributed_ft.engine.precision import resolve_mixed_precision
from distributed_ft.errors import ConfigError


def configure_device_env() -> None:
    """Tell DeepSpeed which accelerator it is on before anything imports it (it guesses noisily)."""
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    if deepspeed_requested() and not torch.cuda.is_available():
        skip_shared_memory_allreduce_build()


def skip_shared_memory_allreduce_build() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory all-reduce (C++, JIT, under a file lock in
    ~/.cache/torch_extensions) when its process group starts, though only its inference all-reduce calls it:
    training goes through gloo. Skipped, a first launch needs no compiler and spends no minutes building, and a
    build killed midway cannot leave a lock that every later launch waits on forever."""
    import importlib

    # by module path: the attribute deepspeed.comm.torch is the torch package, which deepspeed.comm imports
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def launch_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _deepspeed_plugin(training):
    from accelerate.utils import DeepSpeedPlugin

    clip = training.max_grad_norm or 0.0
    plugin = DeepSpeedPlugin()  # reads the launcher's environment (config file or flags)
    plugin.gradient_accumulation_steps = training.gradient_accumulation_steps
    plugin.gradient_clipping = clip
    plugin.zero3_save_16bit_model = True
    ds = plugin.deepspeed_config
    world = launch_world_size()
    for key, value in (("train_micro_batch_size_per_gpu", training.micro_batch_size),
                       ("train_batch_size", training.micro_batch_size * training.gradient_accumulation_steps * world),
                       ("gradient_clipping", clip),
                       ("gradient_accumulation_steps", training.gradient_accumulation_steps)):
        current = ds.get(key, "auto")
        if current not in ("auto", value):
            raise ConfigError(f"the DeepSpeed config sets {key}={current} but the run config implies {value}; "
                              f"use \"auto\" in the DeepSpeed JSON")
        ds[key] = value
    zero = ds.setdefault("zero_optimization", {})
    zero["stage3_gather_16bit_weights_on_model_save"] = True
    offloaded = str(zero.get("offload_param", {}).get("device", "none")) not in ("none", "None")
    if str(zero.get("offload_optimizer", {}).get("device", "none")) not in ("none", "None"):
        # accelerate swaps an offloaded torch optimizer for DeepSpeed's CPU Adam, keeping only lr and weight
        # decay: keep that fast path only where it is the configured optimizer, else train with the configured one.
        same = training.optimizer in ("adam", "adamw") and tuple(training.adam_betas) == (0.9, 0.999) \
            and training.adam_epsilon == 1e-8
        ds.setdefault("zero_force_ds_cpu_optimizer", same)
    if plugin.zero_stage == 3 and world == 1 and not offloaded:
        raise ConfigError("ZeRO-3 shards parameters across processes but this launch has 1 process; "
                          "launch with --num_processes >= 2, use launch/single.yaml, or enable parameter offload")
    return plugin


def build_accelerator(training, logging=None, run_dir: str | None = None, model_dtype: str = "fp32",
                      auto_fp32: str | None = None):
    """Create the Accelerator for this launch (gloo on CPU, DeepSpeed when the launcher asked for it), in the
    mixed precision `training.mixed_precision` resolves to here, with the experiment trackers `logging` names
    writing under `run_dir`; console logging is set up for it (rank 0 at INFO). `auto_fp32`: why `auto` means
    fp32 for this run kind, where it does."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers = []
    launched = "LOCAL_RANK" in os.environ or launch_world_size() > 1
    if launched and not torch.cuda.is_available():
        # On CPU DeepSpeed needs an explicit gloo group, otherwise accelerate sees one process per rank.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    kwargs = {}
    if deepspeed_requested():
        configure_device_env()
        kwargs["deepspeed_plugin"] = _deepspeed_plugin(training)
    elif launched and not torch.cuda.is_available():
        kwargs["cpu"] = True  # several CPU processes: data parallel over gloo
    if logging is not None and logging.active_trackers:
        kwargs.update(log_with=logging.active_trackers, project_dir=run_dir)
    precision, why = resolve_mixed_precision(training.mixed_precision, model_dtype, deepspeed_requested(), auto_fp32)
    if not launched:
        _allow_another_precision(precision)
    accelerator = Accelerator(gradient_accumulation_steps=training.gradient_accumulation_steps,
                              mixed_precision=precision, kwargs_handlers=handlers, **kwargs)
    accelerator.precision_reason = why  # for the run log's device line (report_device)
    if accelerator.device.type == "cpu":  # before the model loads: its tensors are the first to reuse memory
        accelerator.cpu_allocator = keep_freed_memory()
    _check_topology(accelerator)
    setup_console_logging(accelerator.is_main_process)
    return accelerator


def _allow_another_precision(precision: str) -> None:
    """accelerate keeps one mixed precision per process and refuses an Accelerator with another; one process
    that runs several configs (a notebook, a script calling recipes) gets a fresh state for a new precision."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", precision)) != precision:
        AcceleratorState._reset_state(reset_partial_state=True)


def report_device(accelerator) -> None:
    """The run log's line on the device and the precision chosen (on CPU: whether bf16 is native there), said
    when the training loop is set up, after the run's inputs have loaded: a run that bad input stops prints its
    one error line alone."""
    from distributed_ft.engine.logging import logger

    precision = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[str(accelerator.mixed_precision)]
    why = getattr(accelerator, "precision_reason", "training.mixed_precision")
    if accelerator.device.type == "cpu":
        report_cpu_precision(str(accelerator.mixed_precision), precision=f"{precision} ({why})",
                             allocator=getattr(accelerator, "cpu_allocator", None))
    else:
        logger.info(f"device: {accelerator.device}; precision {precision} ({why})")


def _check_topology(accelerator) -> None:
    """A launch that started N processes must train as N ranks, never as N independent runs."""
    from accelerate.utils import DistributedType

    world = launch_world_size()
    if world > 1 and (accelerator.num_processes != world or accelerator.distributed_type == DistributedType.NO):
        raise ConfigError(f"the launcher started {world} processes but accelerate set up "
                          f"{accelerator.num_processes} ({accelerator.distributed_type}); check the launch config")


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int | None:
    if not uses_deepspeed(accelerator):
        return None
    return accelerator.state.deepspeed_plugin.zero_stage


def gathers_per_module_call(accelerator) -> bool:
    """ZeRO-3 over several processes: every call of a partitioned module gathers its weights collectively."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return accelerator.num_processes > 1 and plugin is not None and plugin.zero_stage == 3


def agree_on_max(accelerator):
    """Where module calls are collective, n -> the largest n over the processes (itself a collective), so every
    process makes as many calls; None elsewhere."""
    if not gathers_per_module_call(accelerator):
        return None
    import torch

    def agree(n: int) -> int:
        return int(accelerator.gather(torch.tensor([n], device=accelerator.device)).max())

    return agree
