"""Reward grading for reinforcement-learning fine-tuning: grader specs, local grading, HTTP service and client.

Grader specs use the field names of OpenAI's fine-tuning graders (string_check, text_similarity, python,
score_model, label_model, multi), so a grader written for that service loads unchanged.
"""
from distributed_ft.grader.results import GradeResult

# The shared secret of a grader that listens beyond loopback: the server requires it, the client sends it.
TOKEN_ENV = "DFT_GRADER_TOKEN"

__all__ = ["GradeResult", "TOKEN_ENV"]
