"""`dft export`, `dft generate` and `dft chat` on the built-in tiny Llama.

Adapters are applied in-process with each strategy's own `apply`, their trainable tensors moved off their
initial values (as training would), and written with the strategy's save hook plus the tokenizer, exactly the
final/ folder `dft train` writes. Only the chat test starts a process (in a pseudo-terminal, as a user would).
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from distributed_ft.cli import main
from distributed_ft.config import load_config
from distributed_ft.data.tokenize import encode_prompt
from distributed_ft.models.builtin import builtin_model_path
from distributed_ft.strategies import get_strategy, load_trained
from distributed_ft.strict import config_to_dict, parse_section
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[5, 17, 42, 99, 123, 7, 130, 11], [9, 8, 115, 31, 77, 100, 4, 64]])  # vocab: 134
REPORT = """# Evaluation report

- strategy: `lora`

| task | metric | baseline | fine-tuned | change |
|---|---|---|---|---|
| copy | exact_match | 0.0000 | 0.9123 | +0.9123 |
"""
PROMPT = "12+7="


@pytest.fixture(scope="module")
def base() -> str:
    return str(builtin_model_path("tiny"))


def make_adapter(base: str, out: Path, options: dict, task: str = "causal_lm") -> Path:
    """A strategy's final/ folder: applied to the tiny base, trainable tensors moved, saved by its hook."""
    strategy = get_strategy(options["name"])
    cfg = parse_section(strategy.config_cls, options, "test.yaml", ("strategy",))
    if task == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(base)
    else:
        torch.manual_seed(3)
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)
    torch.manual_seed(1)  # PEFT initialises lora_A from the global generator
    model = strategy.apply(model, cfg, task)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=gen))
    strategy.save(model, str(out), None)
    AutoTokenizer.from_pretrained(base).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory) -> Path:
    """A run directory as `dft train configs/lora.yaml` leaves it: config.yaml, final/ and eval/report.md."""
    run = tmp_path_factory.mktemp("runs") / "lora"
    make_adapter(base, run / "final", {"name": "lora", "r": 4, "alpha": 8})
    config = load_config(REPO / "configs/lora.yaml", ["strategy.r=4", "strategy.alpha=8", "output.dir=runs/lora"])
    (run / "config.yaml").write_text("# resolved run config\n" + yaml.safe_dump(config_to_dict(config), sort_keys=False))
    (run / "eval").mkdir()
    (run / "eval" / "report.md").write_text(REPORT)
    return run


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits.float()


def dft(*args) -> int:
    return main([str(a) for a in args])


def tensor_dtypes(folder: Path) -> set[torch.dtype]:
    found = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            found |= {handle.get_tensor(key).dtype for key in handle.keys()}
    return found


# ------------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("options,task", [
    ({"name": "lora", "r": 4, "alpha": 8}, "causal_lm"),
    ({"name": "lora", "r": 4, "use_dora": True}, "causal_lm"),
    ({"name": "ia3"}, "causal_lm"),
    ({"name": "lora", "r": 4}, "sequence_classification"),
], ids=["lora", "dora", "ia3", "lora-classifier"])
def test_merged_export_loads_with_transformers_and_matches_base_plus_adapter(base, tmp_path, options, task):
    adapter = make_adapter(base, tmp_path / "final", options, task)
    out = tmp_path / "export"
    assert dft("export", adapter, "-o", out, "--merge") == 0

    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    exported = auto.from_pretrained(out).eval()
    assert type(exported).__name__.startswith("Llama")  # a plain transformers model, no PEFT wrapper
    reference = logits(load_trained(str(adapter)))
    torch.testing.assert_close(logits(exported), reference, atol=1e-4, rtol=0)
    if task == "causal_lm":  # the adapter really changed the model, so a merge that dropped it would fail above
        assert (logits(AutoModelForCausalLM.from_pretrained(base)) - reference).abs().max() > 1e-3
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names
    assert ("generation_config.json" in names) == (task == "causal_lm")
    assert not names & {"adapter_config.json", "adapter_model.safetensors", "base_model.json"}
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert AutoTokenizer.from_pretrained(out)("1+1=")["input_ids"] == AutoTokenizer.from_pretrained(base)("1+1=")["input_ids"]


@pytest.mark.parametrize("options,reason", [
    ({"name": "prefix_tuning", "num_virtual_tokens": 4}, "virtual tokens"),
    ({"name": "prompt_tuning", "num_virtual_tokens": 4}, "virtual tokens"),
    ({"name": "adapters", "adapter_size": 8}, "forward hooks"),
], ids=["prefix_tuning", "prompt_tuning", "bottleneck"])
def test_unmergeable_adapters_are_refused_in_one_line(base, tmp_path, capsys, options, reason):
    adapter = make_adapter(base, tmp_path / "final", options)
    capsys.readouterr()
    assert dft("export", adapter, "-o", tmp_path / "export", "--merge") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "cannot be merged" in err, err
    assert reason in err and "Traceback" not in err
    assert not (tmp_path / "export").exists()


def test_adapter_without_merge_is_refused_with_the_hint(lora_run, tmp_path, capsys):
    assert dft("export", lora_run, "-o", tmp_path / "export") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--merge" in err and "LORA adapter" in err, err
    assert not (tmp_path / "export").exists()


def test_model_card_holds_the_run_config_and_eval_table(lora_run, tmp_path):
    out = tmp_path / "export"
    assert dft("export", lora_run, "-o", out, "--merge") == 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    config_yaml = (lora_run / "config.yaml").read_text().strip()
    assert "## Training config" in card and config_yaml in card
    assert "## Evaluation" in card and "| copy | exact_match | 0.0000 | 0.9123 | +0.9123 |" in card
    # the embedded report's headings sit under the card's own section
    assert "\n## Evaluation report" not in card and "\n### Evaluation report" in card
    # a second export into the same folder is refused, --overwrite replaces it
    assert dft("export", lora_run, "-o", out, "--merge") == 2
    assert dft("export", lora_run, "-o", out, "--merge", "--overwrite") == 0


def test_bf16_export_writes_bf16_weights(lora_run, tmp_path):
    out = tmp_path / "export"
    assert dft("export", lora_run, "-o", out, "--merge", "--dtype", "bf16") == 0
    assert tensor_dtypes(out) == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    reference = logits(load_trained(str(lora_run / "final")))
    assert (logits(model) - reference).abs().max() < 0.25  # the same model, at bf16 precision


def test_model_folder_is_rewritten_as_is(base, tmp_path):
    """A full fine-tune's folder (here the base itself) keeps every tensor exactly; --merge is not needed."""
    out = tmp_path / "export"
    assert dft("export", base, "-o", out) == 0
    assert tensor_dtypes(out) == {torch.float32}
    original = AutoModelForCausalLM.from_pretrained(base).state_dict()
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)
    assert (out / "generation_config.json").is_file()


def test_push_to_hub_creates_a_private_repo_and_uploads_the_export(lora_run, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw))
                        or f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(
        ("upload", kw["repo_id"], {**kw, "files": sorted(p.name for p in Path(kw["folder_path"]).iterdir())})))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no login store: the token is the environment's
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = tmp_path / "export"
    # without a token: refused before anything is sent
    assert dft("export", lora_run, "-o", out, "--merge", "--push-to-hub", "me/tiny-lora") == 2
    assert "HF_TOKEN" in capsys.readouterr().err and calls == []

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert dft("export", lora_run, "-o", out, "--merge", "--overwrite", "--push-to-hub", "me/tiny-lora") == 0
    (create, repo, create_kw), (upload, upload_repo, upload_kw) = calls
    assert (create, repo, upload, upload_repo) == ("create", "me/tiny-lora", "upload", "me/tiny-lora")
    assert create_kw["private"] is True and create_kw.get("repo_type") == "model"
    assert Path(upload_kw["folder_path"]) == out and "model.safetensors" in upload_kw["files"]
    assert "token" not in create_kw and "token" not in upload_kw  # huggingface_hub reads it itself
    assert "https://huggingface.co/me/tiny-lora" in capsys.readouterr().out

    calls.clear()
    assert dft("export", lora_run, "-o", out, "--merge", "--overwrite", "--push-to-hub", "me/x", "--public") == 0
    assert calls[0][2]["private"] is False


# ------------------------------------------------------------------------------------------ generate, chat
def greedy(model, tokenizer, prompt: str, n: int) -> str:
    ids = torch.tensor([encode_prompt(tokenizer, prompt)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_generate_prints_the_greedy_completion(lora_run, capsys):
    tokenizer = AutoTokenizer.from_pretrained(lora_run / "final")
    expected = greedy(load_trained(str(lora_run / "final")), tokenizer, PROMPT, 12)
    assert expected.strip()  # a real completion, so an empty print could not pass
    capsys.readouterr()
    assert dft("generate", lora_run, "--prompt", PROMPT, "--max-new-tokens", "12") == 0
    assert capsys.readouterr().out == expected + "\n"
    # seeded sampling is reproducible
    args = ("generate", lora_run, "--prompt", PROMPT, "--max-new-tokens", "12", "--temperature", "1.5", "--seed", "4")
    assert dft(*args) == 0 and dft(*args) == 0
    first, second = capsys.readouterr().out.splitlines()[-2:]
    assert first == second


class Recorder(io.StringIO):
    """stdout that records each write, to see the reply arrive in pieces."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_chat_keeps_the_history_and_streams_the_reply(lora_run, monkeypatch):
    from distributed_ft.recipes import generate

    prompts, replies, shown = [], [], []
    real = generate.complete
    out = Recorder()

    def recording(model, tokenizer, prompt, sampling, streamer=None, stop=None):
        assert isinstance(streamer, BaseStreamer)
        prompts.append(prompt)
        replies.append(real(model, tokenizer, prompt, sampling, streamer=streamer, stop=stop))
        shown.append(out.getvalue())  # what the terminal showed by the time generate returned
        return replies[-1]

    monkeypatch.setattr(generate, "complete", recording)
    code = generate.chat(str(lora_run), generate.Sampling(max_new_tokens=8),
                         stdin=io.StringIO("hello there\nand then?\n"), stdout=out)
    assert code == 0 and len(prompts) == 2 and all(r.strip() for r in replies)
    # no chat template: dft's own chat turns; the second prompt carries the first exchange
    assert prompts[0] == "<|user|>\nhello there\n<|assistant|>\n"
    assert prompts[1] == f"{prompts[0]}{replies[0].strip()}\n<|user|>\nand then?\n<|assistant|>\n"
    for reply, seen in zip(replies, shown):  # streamed during generation, not printed after it
        assert seen.endswith(f"assistant> {reply}\n"), (seen, reply)
    assert out.writes.count("assistant> ") == 2

    # Ctrl-C at the prompt ends the chat quietly
    class Interrupted(io.StringIO):
        def readline(self, *args):
            raise KeyboardInterrupt

    monkeypatch.setattr(generate, "complete", real)
    assert generate.chat(str(lora_run), stdin=Interrupted(), stdout=io.StringIO()) == 0


def test_chat_prompt_uses_the_tokenizers_template_when_it_has_one(base):
    from distributed_ft.recipes.generate import chat_prompt

    tokenizer = AutoTokenizer.from_pretrained(base)
    history = [{"role": "user", "content": "hi"}]
    assert chat_prompt(tokenizer, history) == ("<|user|>\nhi\n<|assistant|>\n", "<|user|>")
    tokenizer.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}[assistant]{% endif %}")
    assert chat_prompt(tokenizer, history) == ("[user] hi\n[assistant]", None)


def test_streamed_reply_stops_before_the_next_turn(base):
    """The fallback format's reply ends before '<|user|>', even when it arrives split over several tokens."""
    from distributed_ft.recipes.generate import _streamer

    out = io.StringIO()
    streamer = _streamer(AutoTokenizer.from_pretrained(base), "<|user|>", out)
    for chunk in ["four ", "is <", "|us", "er|>\nnext", " question"]:
        streamer.on_finalized_text(chunk)
    streamer.on_finalized_text("", stream_end=True)
    assert out.getvalue() == "four is \n"


def _read_until(fd: int, buffer: bytearray, needle: bytes, count: int, deadline: float) -> None:
    while buffer.count(needle) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out waiting for {needle!r} x{count}; got:\n{buffer.decode(errors='replace')}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            assert chunk, f"chat exited early:\n{buffer.decode(errors='replace')}"
            buffer.extend(chunk)


def test_chat_in_a_terminal_answers_two_prompts_and_exits_on_eof(lora_run, monkeypatch):
    from distributed_ft.recipes import generate

    expected = Recorder()  # the same conversation in-process, to compare the terminal's replies with
    assert generate.chat(str(lora_run), generate.Sampling(max_new_tokens=8),
                         stdin=io.StringIO("hello there\nand then?\n"), stdout=expected) == 0
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "distributed_ft", "chat", str(lora_run), "--max-new-tokens", "8"],
                            stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=dict(os.environ), close_fds=True,
                            start_new_session=True,  # the terminal becomes the chat's controlling terminal
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    transcript = bytearray()
    try:
        deadline = time.monotonic() + 120
        _read_until(master, transcript, b"you> ", 1, deadline)
        os.write(master, b"hello there\n")
        _read_until(master, transcript, b"you> ", 2, deadline)
        os.write(master, b"and then?\n")
        _read_until(master, transcript, b"you> ", 3, deadline)
        os.write(master, b"\x04")  # Ctrl-D
        code = proc.wait(timeout=60)
        while True:
            try:
                ready, _, _ = select.select([master], [], [], 0.5)
                chunk = os.read(master, 4096) if ready else b""
            except OSError:
                chunk = b""
            if not chunk:
                break
            transcript.extend(chunk)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = transcript.decode(errors="replace").replace("\r\n", "\n")
    assert code == 0, text
    assert "Traceback" not in text and "error:" not in text, text
    answers = re.findall(r"assistant> (.*)\n", expected.getvalue())
    assert len(answers) == 2 and all(a.strip() for a in answers), expected.getvalue()
    assert "you> hello there\nassistant> " in text and "you> and then?\nassistant> " in text, text  # echoed input
    for answer in answers:
        assert f"assistant> {answer}\n" in text, (answer, text)
