"""Preference training: pair and graded-sample data, the pairwise losses (Bradley-Terry, the DPO family)
and the pairwise training loop the `rm` and `dpo` recipes share."""
