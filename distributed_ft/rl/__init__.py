"""PPO fine-tuning against a grader service: config, rollouts, math, the update loop and its evaluation."""
