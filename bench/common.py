"""Shared pieces of the training benchmarks: a seeded Llama folder with a word-level tokenizer,
fixed-length and lognormal-length synthetic text rows, peak-memory readings, machine load, the CPU's
native-bf16 flag and matmul peak, result files, and the `--smoke` mode every benchmark has (`parse_args`,
`Sanity`, `exit_status`).

Every synthetic word is one token of the word-level tokenizer and the tokenizer adds no special
tokens, so a text of at least N words truncated to N tokens is exactly the first N word ids: the
engine (which tokenizes the text itself) and the reference loops (fed pre-tokenised ids) then
process identical token counts.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]

# The throughput model: ~4.2M parameters, fp32.
SMALL_LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=2000)
# A ~100M-class model (134.3M parameters untied, 85.0M outside the embedding and LM head), fp32.
LLAMA_100M = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=12, vocab_size=32000)
# The --smoke model: ~0.15M parameters, for checking that code paths run, never for timing.
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=500)


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


def lognormal_lengths(n_rows: int, median_len: float, cap: int, *, sigma: float = 0.8, minimum: int = 8,
                      seed: int = 0) -> list[int]:
    """`n_rows` row lengths drawn from a lognormal with this median and log-space spread `sigma`, rounded and
    clipped to [minimum, cap]; deterministic for a given seed."""
    if not 1 <= minimum <= cap:
        raise ValueError(f"need 1 <= minimum ({minimum}) <= cap ({cap})")
    rng = random.Random(seed)
    return [min(cap, max(minimum, round(median_len * math.exp(sigma * rng.gauss(0.0, 1.0))))) for _ in range(n_rows)]


def eos_rows(lengths: list[int], vocab_size: int, eos_id: int, seed: int = 0) -> list[list[int]]:
    """One row per length: length - 1 word ids drawn as in `synthetic_rows`, then `eos_id`. That is exactly
    what a causal-LM data pipeline makes of the text of those words when it appends EOS to every row (see
    `write_words_jsonl`), so the engine and loops fed these ids see the same tokens."""
    rng = random.Random(seed)
    first = len(SPECIAL_TOKENS)
    return [[rng.randrange(first, vocab_size) for _ in range(n - 1)] + [eos_id] for n in lengths]


def write_words_jsonl(path: str | Path, rows: list[list[int]]) -> Path:
    """Write each row but its last (EOS) id as {"text": words}: one word per id, nothing added or cut."""
    path = Path(path)
    with open(path, "w") as handle:
        for ids in rows:
            handle.write(json.dumps({"text": " ".join(word(i - len(SPECIAL_TOKENS)) for i in ids[:-1])}) + "\n")
    return path


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


def native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (x86 AVX512-BF16 or AMX-BF16, Arm BF16); without it torch emulates
    bf16 through fp32, which is slower than fp32 itself."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return bool(set(value.split()) & {"avx512_bf16", "amx_bf16", "bf16"})
    return False


def matmul_peak(size: int = 2048, threads: int | None = None, repeats: int = 3) -> dict:
    """This machine's measured matmul rate, FLOP/s for fp32 and bf16: the best of `repeats` timed
    `size`^3 products (after one untimed), on `threads` torch threads (the current setting if None).
    The product is `F.linear(x, w)`, what a model's linear layers compute; on a CPU without native bf16
    torch's bf16 `F.linear` is several times faster than its bf16 `torch.mm`, so this is the bf16 peak."""
    import torch
    import torch.nn.functional as F

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        out = {"size": size, "threads": torch.get_num_threads(), "repeats": repeats, "op": "F.linear"}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(size, size, generator=generator).to(dtype)
            w = torch.randn(size, size, generator=generator).to(dtype)
            with torch.no_grad():
                F.linear(x, w)
                best = float("inf")
                for _ in range(repeats):
                    start = time.perf_counter()
                    F.linear(x, w)
                    best = min(best, time.perf_counter() - start)
            out[f"{name}_flops"] = 2 * size ** 3 / best
            out[f"{name}_best_s"] = best
        return out
    finally:
        torch.set_num_threads(before)


def versions() -> dict:
    import accelerate
    import torch
    import transformers

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
           "accelerate": accelerate.__version__}
    for name in ("trl", "deepspeed"):  # read from the installed metadata: importing them takes seconds
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_results(name: str, payload: dict, smoke: bool = False) -> Path:
    """Write `payload` to bench/results/<name>-<UTC time>.json (<name>-smoke-... for a smoke run, whose
    figures say nothing about speed); the payload records `smoke` either way."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-smoke" if smoke else name
    path = RESULTS / f"{stem}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.json"
    path.write_text(json.dumps({"smoke": smoke, **payload}, indent=2) + "\n")
    return path


def run_process(cmd: list[str], env: dict, timeout: float):
    """subprocess.run with output captured, in its own process group: on timeout the whole group is killed, so a
    launcher's rank processes cannot outlive it and load the machine for whatever runs next."""
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise SystemExit(f"{' '.join(cmd[:4])} ... did not finish within {timeout} s (its processes were killed)")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def run_worker(cmd: list[str], env: dict, timeout: float, name: str, mark: str) -> dict:
    """Run one benchmark worker process; return the JSON its last `mark`-prefixed stdout line holds.
    A failed or silent worker ends the benchmark with its output tails on stderr."""
    proc = run_process(cmd, env, timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(mark)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"the {name} run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(mark):])


def median(values: list[float]) -> float:
    values = sorted(values)
    n = len(values)
    if not n:
        raise ValueError("median of nothing")
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


# ---- --smoke: every code path at tiny sizes, in seconds ---------------------------------------------------

SMOKE_HELP = ("smoke test: tiny sizes (small model, 1-2 steps or requests, 1 round) through every variant; fails "
              "if a variant crashes or produces nonsense, does not check the performance targets")


def parse_args(parser: argparse.ArgumentParser, smoke: dict) -> argparse.Namespace:
    """Add `--smoke` to `parser` and parse; with `--smoke` the defaults become `smoke` (the tiny sizes),
    while options given explicitly on the command line still win."""
    parser.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = parser.parse_args()
    if args.smoke:
        unknown = sorted(set(smoke) - set(vars(args)))
        if unknown:
            raise ValueError(f"smoke defaults for unknown options: {unknown}")
        parser.set_defaults(**smoke)
        args = parser.parse_args()
    return args


class Sanity:
    """Checks that every run produced meaningful output (it ran its steps, finite losses, tokens or samples
    actually produced, rates above zero). Enforced in full and smoke runs alike: unlike the performance
    targets they do not depend on the sizes."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def check(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(what)
        return bool(ok)

    def finite(self, what: str, value, *, positive: bool = False) -> bool:
        """`value` is a finite number (and > 0 with `positive`)."""
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and (value > 0 or not positive))
        return self.check(ok, f"{what} = {value!r}, expected a finite{' positive' if positive else ''} number")

    def all_finite(self, what: str, values) -> bool:
        values = list(values) if values is not None else []
        bad = [v for v in values if not (isinstance(v, (int, float)) and math.isfinite(v))]
        return self.check(bool(values) and not bad, f"{what}: expected finite numbers, got "
                                                    f"{values[:8]!r}{' ...' if len(values) > 8 else ''}")

    @property
    def ok(self) -> bool:
        return not self.failures


def exit_status(sanity: Sanity, targets_met: bool, smoke: bool) -> int:
    """The benchmark's exit status: 1 when a sanity check failed; otherwise 0 in a smoke run (its sizes say
    nothing about speed, so the targets are not checked), else 0 exactly when the targets are met."""
    for failure in sanity.failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    if not sanity.ok:
        return 1
    if smoke:
        print("smoke run: every variant ran and produced sane output (performance targets not checked)")
        return 0
    return 0 if targets_met else 1
