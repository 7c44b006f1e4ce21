"""`dft plan` (memory per GPU for each ZeRO stage) and `dft slurm render|submit` (multi-node jobs)."""
from __future__ import annotations

import json


def add_subparser(subparsers) -> None:
    plan = subparsers.add_parser("plan", help="memory per GPU for each ZeRO stage and offload choice")
    plan.add_argument("config")
    plan.add_argument("overrides", nargs="*", help="key.sub=value")
    plan.add_argument("--gpus", type=int, required=True, help="data-parallel GPUs in total")
    plan.add_argument("--gpu-memory", type=float, default=80.0, metavar="GB", help="memory of one GPU (default 80)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=_cmd_plan)

    slurm = subparsers.add_parser("slurm", help="render or submit a multi-node Slurm job for a run config")
    slurm_sub = slurm.add_subparsers(dest="slurm_command", required=True)
    for name, func, help_text in (("render", _cmd_render, "write a ready sbatch script"),
                                  ("submit", _cmd_submit, "render the sbatch script and submit it")):
        p = slurm_sub.add_parser(name, help=help_text)
        p.add_argument("config")
        p.add_argument("overrides", nargs="*", help="key.sub=value passed to the run")
        p.add_argument("--nodes", type=int, default=1)
        p.add_argument("--gpus-per-node", type=int, default=0, help="0 for CPU nodes (gloo)")
        p.add_argument("--processes-per-node", type=int, help="default: one per GPU, 1 on CPU nodes")
        p.add_argument("--cpus-per-node", type=int, help="CPUs for each node's ranks (sbatch --cpus-per-task)")
        p.add_argument("--launch", help="accelerate launch config (default launch/zero3.yaml, "
                                        "launch/zero2_cpu.yaml without GPUs)")
        p.add_argument("--kind", choices=("train", "eval", "ppo"), default="train")
        p.add_argument("--partition")
        p.add_argument("--time", help="time limit, e.g. 02:00:00")
        p.add_argument("--account")
        p.add_argument("--signal-lead", type=int, default=300, metavar="SECONDS",
                       help="send USR1 this long before the time limit: checkpoint and stop (default 300)")
        p.add_argument("--requeue", action="store_true",
                       help="requeue the job after a signalled stop; it resumes from the checkpoint")
        p.add_argument("--job-name")
        p.add_argument("--log-dir", default="slurm-logs")
        p.add_argument("--template", help="sbatch template (default slurm/<kind>.sbatch)")
        p.add_argument("-o", "--output", help="where to write the script (default LOG_DIR/JOB_NAME.sbatch)")
        p.set_defaults(func=func)


def _cmd_plan(args) -> int:
    from dataclasses import asdict

    from distributed_ft.cluster.plan import format_plan, plan_for_run_config
    from distributed_ft.config import load_config

    plan = plan_for_run_config(load_config(args.config, args.overrides), args.gpus, args.gpu_memory)
    if args.json:
        rows = [{"stage": r.option.stage, "offload": r.option.offload, "launch": r.option.launch,
                 **asdict(r.states), "states": r.states.total, "activations": r.activations,
                 "gpu_total": r.gpu_total, "fits": plan.fits(r)} for r in plan.rows]
        print(json.dumps({"model": asdict(plan.shape), "gpus": plan.gpus, "gpu_memory_gb": plan.gpu_memory_gb,
                          "precision": plan.precision, "rows": rows,
                          "recommended_launch": plan.recommended_launch()}, indent=1))
    else:
        print(format_plan(plan))
    return 0


def _spec(args):
    from distributed_ft.cluster.slurm import JobSpec

    return JobSpec(config=args.config, overrides=list(args.overrides), nodes=args.nodes,
                   gpus_per_node=args.gpus_per_node, processes_per_node=args.processes_per_node,
                   cpus_per_node=args.cpus_per_node,
                   launch=args.launch, kind=args.kind, partition=args.partition, time=args.time,
                   account=args.account, signal_lead=args.signal_lead, requeue=args.requeue,
                   job_name=args.job_name, log_dir=args.log_dir, template=args.template)


def _cmd_render(args) -> int:
    from distributed_ft.cluster.slurm import write

    print(write(_spec(args), args.output))
    return 0


def _cmd_submit(args) -> int:
    from distributed_ft.cluster.slurm import submit, write

    path = write(_spec(args), args.output)
    job = submit(path)
    print(f"submitted job {job} ({path})")
    return 0
