"""distributed_ft: fine-tune language models with any strategy, from one CPU to a Slurm cluster."""

__version__ = "0.1.0"
