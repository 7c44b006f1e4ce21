"""`dft generate MODEL_OR_RUN --prompt TEXT` and `dft chat MODEL_OR_RUN`: text from a trained model.

MODEL_OR_RUN is a run directory (its final/), any folder `load_trained` reads (a model folder, a PEFT adapter
folder, bottleneck adapters) or a Hub model id. Prompts are encoded exactly as training encoded them
(`distributed_ft.data.tokenize.encode_prompt`). Decoding is greedy unless a temperature above 0 is given; then
it samples with `top_p`, seeded by `seed`.

`generate` is the linear path: load -> encode the prompt -> generate -> print the completion (new tokens only,
special tokens dropped). `chat` loops: read a line from stdin -> append it to the conversation -> render the
conversation with the tokenizer's chat template (when it has one; else the `<|user|>` / `<|assistant|>` turns that
`dft train` uses for chat data without a template, `distributed_ft.data.formats.simple_chat_prompt`) -> stream
the reply token by token (transformers' TextStreamer) -> keep it in the history. The oldest turns are dropped
when the conversation outgrows the model's context. End of input (Ctrl-D) or Ctrl-C ends the chat with exit
code 0.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from distributed_ft.errors import ModelError

# The fallback chat format's next turn; a reply stops before it.
_NEXT_TURN = "<|user|>"


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0   # 0 = greedy
    top_p: float = 1.0
    seed: int = 0

    def generate_kwargs(self, tokenizer) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.temperature > 0,
                                  "eos_token_id": tokenizer.eos_token_id,
                                  "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                  else tokenizer.eos_token_id}
        if self.temperature > 0:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs


def check_sampling(sampling: Sampling) -> Sampling:
    if sampling.max_new_tokens < 1:
        raise ModelError(f"--max-new-tokens must be at least 1 (got {sampling.max_new_tokens})")
    if sampling.temperature < 0:
        raise ModelError(f"--temperature must be 0 (greedy) or more (got {sampling.temperature})")
    if not 0 < sampling.top_p <= 1:
        raise ModelError(f"--top-p must be in (0, 1] (got {sampling.top_p})")
    return sampling


def load_for_generation(name: str):
    """(model in eval mode, tokenizer) for a run directory, a saved model/adapter folder or a Hub id."""
    from distributed_ft.engine.chunked_loss import bare_model
    from distributed_ft.models import load_model, load_tokenizer
    from distributed_ft.models.config import ModelConfig
    from distributed_ft.strategies.loading import load_trained, load_trained_tokenizer, resolve_trained_path

    path = resolve_trained_path(name)
    if path is not None:
        model, tokenizer = load_trained(str(path)), load_trained_tokenizer(path)
    elif Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        raise ModelError(f"{name}: not a run directory or a model folder (no final/, config.json or adapter)")
    else:  # a Hub id
        config = ModelConfig(name_or_path=name)
        tokenizer = load_tokenizer(name, config)
        model = load_model(config, tokenizer, name).eval()
    base = bare_model(model)
    if not base.can_generate():
        raise ModelError(f"{name}: a {type(base).__name__} predicts labels and does not generate text; "
                         "score it with `dft eval`")
    return model, tokenizer


def complete(model, tokenizer, prompt: str, sampling: Sampling, streamer=None, stop: str | None = None) -> str:
    """The completion of `prompt`: the new tokens decoded without special tokens (cut before `stop`)."""
    import torch

    from distributed_ft.data.tokenize import encode_prompt

    ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=model.device)
    kwargs = sampling.generate_kwargs(tokenizer)
    if stop:
        kwargs.update(stop_strings=[stop], tokenizer=tokenizer)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer, **kwargs)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return text.split(stop)[0] if stop else text


def generate(name: str, prompt: str, sampling: Sampling = Sampling()) -> int:
    """`dft generate`: print the completion of `prompt`."""
    import torch

    check_sampling(sampling)
    model, tokenizer = load_for_generation(name)
    torch.manual_seed(sampling.seed)
    print(complete(model, tokenizer, prompt, sampling), flush=True)
    return 0


def chat_prompt(tokenizer, history: list[dict]) -> tuple[str, str | None]:
    """(prompt text, stop string) for the conversation: the chat template's, else dft's fallback turns."""
    from distributed_ft.data.formats import has_chat_template, simple_chat_prompt

    if has_chat_template(tokenizer):
        try:
            return tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True), None
        except Exception as err:  # noqa: BLE001 - templates raise arbitrary errors on odd conversations
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ModelError(f"the tokenizer's chat template failed: {first}") from None
    return simple_chat_prompt(history), _NEXT_TURN


def fit_history(tokenizer, history: list[dict], budget: int) -> list[dict]:
    """The latest turns whose prompt fits `budget` tokens (the newest user turn is always kept)."""
    from distributed_ft.data.tokenize import encode_prompt

    kept = list(history)
    while len(kept) > 1 and len(encode_prompt(tokenizer, chat_prompt(tokenizer, kept)[0])) > budget:
        kept = kept[2:] if len(kept) > 2 else kept[1:]
    return kept


def _streamer(tokenizer, stop: str | None, out: TextIO):
    """A TextStreamer that writes to `out` and holds back text that may be the start of `stop`."""
    from transformers import TextStreamer

    class ReplyStreamer(TextStreamer):
        def __init__(self):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.pending, self.stopped = "", False

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if not self.stopped:
                self.pending += text
                cut = self.pending.find(stop) if stop else -1
                if cut >= 0:
                    ready, self.pending, self.stopped = self.pending[:cut], "", True
                elif stream_end or not stop:
                    ready, self.pending = self.pending, ""
                else:  # keep a tail that could still grow into `stop`
                    keep = max((k for k in range(1, len(stop)) if self.pending.endswith(stop[:k])), default=0)
                    ready, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
                out.write(ready)
            if stream_end:
                out.write("\n")
                self.pending, self.stopped = "", False
            out.flush()

    return ReplyStreamer()


def chat(name: str, sampling: Sampling = Sampling(), stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """`dft chat`: an interactive conversation on stdin/stdout; EOF or Ctrl-C ends it (exit code 0)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    check_sampling(sampling)
    try:
        import torch

        model, tokenizer = load_for_generation(name)
        torch.manual_seed(sampling.seed)
        context = getattr(model.config, "max_position_embeddings", None) or 2048
        history: list[dict] = []
        stdout.write(f"[dft] chatting with {name}; Ctrl-D or Ctrl-C to quit\n")
        while True:
            stdout.write("you> ")
            stdout.flush()
            line = stdin.readline()
            if not line:  # EOF (Ctrl-D)
                stdout.write("\n")
                return 0
            message = line.strip()
            if not message:
                continue
            history = fit_history(tokenizer, history + [{"role": "user", "content": message}],
                                  context - sampling.max_new_tokens)
            prompt, stop = chat_prompt(tokenizer, history)
            stdout.write("assistant> ")
            stdout.flush()
            reply = complete(model, tokenizer, prompt, sampling, streamer=_streamer(tokenizer, stop, stdout), stop=stop)
            history.append({"role": "assistant", "content": reply.strip()})
    except KeyboardInterrupt:  # Ctrl-C: leave quietly
        stdout.write("\n")
        stdout.flush()
        return 0
