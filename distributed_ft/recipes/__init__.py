"""One module per job that trains or evaluates (sft, ppo, evaluate): each a linear `run(config, overrides)`
the CLI calls, plus a stage object for users' own scripts; and the jobs on a trained model (export: a plain
Hugging Face folder; generate: `dft generate` and `dft chat`), each a linear function the CLI calls. Library
packages never import this package."""
