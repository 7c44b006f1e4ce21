"""Shared pieces of the training benchmarks: a seeded Llama folder with a word-level tokenizer,
fixed-length synthetic text rows, peak-memory readings, machine load and result files.

Every synthetic word is one token of the word-level tokenizer and the tokenizer adds no special
tokens, so a text of at least N words truncated to N tokens is exactly the first N word ids: the
engine (which tokenizes the text itself) and the reference loops (fed pre-tokenised ids) then
process identical token counts.
"""
from __future__ import annotations

import json
import os
import random
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]

# The throughput model: ~4.2M parameters, fp32.
SMALL_LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=2000)


def word(i: int) -> str:
    """The i-th synthetic word: letters only, so the whitespace pre-tokenizer keeps it whole."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = ""
    i += 26  # at least two letters, so no word collides with a one-letter special
    while i:
        i, r = divmod(i, 26)
        out = letters[r] + out
    return out


def build_tokenizer(vocab_size: int):
    """A WordLevel tokenizer of exactly `vocab_size` ids: the specials, then synthetic words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [word(i) for i in range(vocab_size - len(SPECIAL_TOKENS))]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words)}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", model_max_length=4096)
    assert len(tokenizer) == vocab_size
    return tokenizer


def build_llama(folder: str | Path, *, seed: int = 0, max_position_embeddings: int = 512, **arch) -> Path:
    """Save a randomly initialised fp32 Llama (safetensors) and its tokenizer to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tokenizer = build_tokenizer(arch["vocab_size"])
    config = LlamaConfig(max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **arch)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def count_llama_parameters(**arch) -> int:
    """Parameters of an untied Llama with this architecture, without building it."""
    h, m, L, v = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"], arch["vocab_size"]
    kv = h * arch.get("num_key_value_heads", arch["num_attention_heads"]) // arch["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * m + 2 * h
    return L * per_layer + 2 * v * h + h


def synthetic_rows(n_rows: int, seq_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """`n_rows` rows of exactly `seq_len` ids drawn from the word ids (never a special token)."""
    rng = random.Random(seed)
    first = len(SPECIAL_TOKENS)
    return [[rng.randrange(first, vocab_size) for _ in range(seq_len)] for _ in range(n_rows)]


def write_text_jsonl(path: str | Path, rows: list[list[int]], extra_words: int = 8) -> Path:
    """Write rows as {"text": ...}; a few extra words per row make the engine truncate to exactly seq_len."""
    path = Path(path)
    rng = random.Random(len(rows))
    with open(path, "w") as handle:
        for ids in rows:
            tail = [rng.randrange(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + 26) for _ in range(extra_words)]
            words = [word(i - len(SPECIAL_TOKENS)) for i in ids + tail]
            handle.write(json.dumps({"text": " ".join(words)}) + "\n")
    return path


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """This process's resident set size now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def machine_load() -> dict:
    one, five, fifteen = os.getloadavg()
    return {"loadavg_1m": round(one, 2), "loadavg_5m": round(five, 2), "loadavg_15m": round(fifteen, 2),
            "cpus": os.cpu_count()}


def versions() -> dict:
    import accelerate
    import torch
    import transformers

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
           "accelerate": accelerate.__version__}
    for name in ("trl", "deepspeed"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # not installed, or fails to import on this machine
            out[name] = None
    return out


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def median(values: list[float]) -> float:
    values = sorted(values)
    n = len(values)
    if not n:
        raise ValueError("median of nothing")
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])
