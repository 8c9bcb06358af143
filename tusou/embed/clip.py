"""An operator-supplied CLIP-class model: image and text encoders in ONNX with their tokenizer.

tusou ships no CLIP weights (no package carries them; see docs/words.md for where to get a model). With
``model=clip`` and ``clip_dir`` (``TUSOU_CLIP_DIR``) pointing at a folder laid out as immich lays out its
CLIP models::

    <clip_dir>/visual/model.onnx              image encoder: (N, 3, S, S) float32 -> (N, D)
    <clip_dir>/visual/preprocess_cfg.json     optional: {"size": [S, S] or S, "mean": [..], "std": [..]}
    <clip_dir>/textual/model.onnx             text encoder: (N, L) token ids (int32/int64) -> (N, D)
    <clip_dir>/textual/tokenizer.json         the tokenizer, Hugging Face tokenizers format (CLIP BPE)
    <clip_dir>/config.json                    optional: {"text_cfg": {"context_length": L}, ...}

the image encoder makes the stored vectors (image search works as with any ONNX encoder) and a keyword
search (``data.text``) embeds the text with the text encoder and ranks images by cosine.

The tokenizer is CLIP's byte-level BPE (OpenAI's ``simple_tokenizer``, which open_clip and immich's
exported models use), implemented here from ``tokenizer.json`` so no extra package is needed: lower-case,
whitespace collapsed, words split by CLIP's pattern, each word's UTF-8 bytes mapped to BPE symbols with an
end-of-word suffix, merges applied by rank, then ``<|startoftext|>`` ... ``<|endoftext|>`` padded with 0
to the context length. Tokenizers of another kind (e.g. the SentencePiece ones of multilingual CLIP
models) are refused with a clear message.
"""

from __future__ import annotations

import html
import json
import re
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

__all__ = ["ClipTokenizer", "ClipTextEncoder", "load_visual_config"]

#: CLIP's word pattern (letters, digits, the rest), with \p{L}/\p{N} approximated by Python's classes.
_PATTERN = re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+", re.IGNORECASE
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


class ClipTokenizer:
    def __init__(self, spec: dict[str, Any], context_length: int = 77) -> None:
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise ValueError("tokenizer.json: only CLIP's BPE tokenizer is supported")
        self.vocab: dict[str, int] = model["vocab"]
        self.suffix: str = model.get("end_of_word_suffix") or "</w>"
        merges = model.get("merges") or []
        self.ranks: dict[tuple[str, str], int] = {}
        for rank, m in enumerate(merges):
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            self.ranks[(a, b)] = rank
        added = {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
        self.sot = added.get("<|startoftext|>", self.vocab.get("<|startoftext|>"))
        self.eot = added.get("<|endoftext|>", self.vocab.get("<|endoftext|>"))
        if self.sot is None or self.eot is None:
            raise ValueError("tokenizer.json lacks <|startoftext|> / <|endoftext|>")
        self.context_length = context_length
        self._cache: dict[str, list[str]] = {}

    @classmethod
    def from_file(cls, path: Path, context_length: int = 77) -> ClipTokenizer:
        return cls(json.loads(Path(path).read_text(encoding="utf-8")), context_length)

    def _bpe(self, token: str) -> list[str]:
        if token in self._cache:
            return self._cache[token]
        word = [*token[:-1], token[-1] + self.suffix]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, 1 << 60))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        if len(self._cache) < 10_000:
            self._cache[token] = word
        return word

    def encode(self, text: str) -> list[int]:
        text = re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip().lower()
        b2u = _byte_to_unicode()
        ids: list[int] = []
        for token in _PATTERN.findall(text):
            symbols = "".join(b2u[b] for b in token.encode("utf-8"))
            ids += [self.vocab[s] for s in self._bpe(symbols) if s in self.vocab]
        return ids

    def __call__(self, texts: list[str]) -> np.ndarray:
        """(n, context_length) int64 ids: start, tokens (truncated), end, zero padding."""
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot, *self.encode(text)][: self.context_length - 1] + [self.eot]
            out[row, : len(ids)] = ids
        return out


class ClipTextEncoder:
    """The text half: tokenizer + ``textual/model.onnx`` -> unit vectors. Thread-safe after construction."""

    def __init__(self, folder: Path, threads: int = 0) -> None:
        folder = Path(folder)
        context = 77
        config = folder / "config.json"
        if config.is_file():
            cfg = json.loads(config.read_text(encoding="utf-8"))
            context = int((cfg.get("text_cfg") or {}).get("context_length", context))
        self.tokenizer = ClipTokenizer.from_file(folder / "textual" / "tokenizer.json", context)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(0, int(threads))
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(
            str(folder / "textual" / "model.onnx"), opts, providers=["CPUExecutionProvider"]
        )
        inputs = self._session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 2:
            raise ValueError(f"{folder}/textual/model.onnx: expected one (batch, tokens) input")
        self._input = inputs[0].name
        self._int32 = inputs[0].type == "tensor(int32)"
        outs = [o for o in self._session.get_outputs() if len(o.shape) == 2]
        if not outs:
            raise ValueError(f"{folder}/textual/model.onnx: no 2-D (batch, dim) output")
        self._output = outs[0].name
        self._lock = threading.Lock()

    def embed(self, texts: list[str]) -> np.ndarray:
        ids = self.tokenizer(texts)
        feed = ids.astype(np.int32) if self._int32 else ids
        (y,) = self._session.run([self._output], {self._input: feed})
        v = np.asarray(y, dtype=np.float32)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def load_visual_config(folder: Path) -> tuple[int, tuple[float, float, float], tuple[float, float, float]]:
    """(input size, mean, std) of ``visual/preprocess_cfg.json``; CLIP's defaults where it says nothing."""
    path = Path(folder) / "visual" / "preprocess_cfg.json"
    cfg = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    size = cfg.get("size", 224)
    side = int(size[0] if isinstance(size, list) else size)
    mean = tuple(float(x) for x in cfg.get("mean", CLIP_MEAN))
    std = tuple(float(x) for x in cfg.get("std", CLIP_STD))
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{path}: mean and std need 3 values")
    return side, (mean[0], mean[1], mean[2]), (std[0], std[1], std[2])
