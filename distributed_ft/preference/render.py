"""How a reward model reads a (prompt, completion) and a pointwise grader a (prompt, output, reference):
defined once, for training and for the `score_model` grader that serves the trained model (its spec's
`input` gives the same messages as templates, see REWARD_INPUT and pointwise_input)."""
from __future__ import annotations

# The grader spec's `input` that renders a sample exactly as training did.
REWARD_INPUT = [{"role": "user", "content": "{{ item.prompt }}"},
                {"role": "assistant", "content": "{{ sample.output_text }}"}]


def score_end(tokenizer) -> str:
    """What a pointwise rendering ends with. The score is read from the last token, and a small causal model
    learns the comparison far faster when that token is always the same one (its query can then attend to
    whatever the comparison needs) than when it is the output's last, varying, token: on the built-in samples
    ending on EOS gave +0.11 Spearman at the same step count, in each of three seeds. A chat template already
    ends the turn on fixed tokens; the plain `role: content` rendering gets the tokenizer's EOS."""
    if getattr(tokenizer, "chat_template", None):
        return ""
    return tokenizer.eos_token or ""


def pointwise_messages(tokenizer, prompt: str, output: str, reference: str) -> list[dict[str, str]]:
    """The prompt, the reference and the output in one turn, each on its own line, ending on a fixed token:
    every output token attends to the reference it is compared with, and the tokens compared sit at the
    same offsets from their line starts. On the built-in samples this one-turn rendering reached a higher
    Spearman than the output as an assistant turn after a `reference:` line, at the same step count."""
    return [{"role": "user", "content": f"{prompt}\n{reference}\n{output}{score_end(tokenizer)}"}]


def pointwise_input(tokenizer) -> list[dict[str, str]]:
    """The grader spec's `input` for a pointwise grader: pointwise_messages with the fields as templates."""
    return pointwise_messages(tokenizer, "{{ item.prompt }}", "{{ sample.output_text }}", "{{ item.reference }}")


def pointwise_text(tokenizer, prompt: str, output: str, reference: str) -> str:
    from distributed_ft.grader.hf_models import render_messages

    return render_messages(tokenizer, pointwise_messages(tokenizer, prompt, output, reference),
                           add_generation_prompt=False)


def reward_messages(prompt: str, completion: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def reward_text(tokenizer, prompt: str, completion: str) -> str:
    from distributed_ft.grader.hf_models import render_messages

    return render_messages(tokenizer, reward_messages(prompt, completion), add_generation_prompt=False)


def reward_grader_spec(model_dir: str, name: str = "reward_model", low: float = -1e6, high: float = 1e6,
                       input_messages: list[dict[str, str]] | None = None) -> dict:
    """A `score_model` grader spec that serves a trained reward model (or, with `input_messages`
    pointwise_input(tokenizer), a pointwise grader) folder."""
    return {"type": "score_model", "name": name, "model": str(model_dir), "model_kind": "reward",
            "input": [dict(m) for m in (input_messages or REWARD_INPUT)], "range": [low, high]}
