"""Running on clusters: memory planning per GPU (`dft plan`) and Slurm job scripts (`dft slurm`)."""
