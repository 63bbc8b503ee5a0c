"""all-MiniLM-L6-v2 sentence embeddings, computed with plain torch ops on bdn-loaded weights.

``load()`` streams ``model.safetensors`` through bdn's loader (``weights.load``) onto the
server's device; ``predict`` runs the 6-layer BERT encoder, mean-pools the token states
and L2-normalises them — the same computation as sentence-transformers — and, given a
``query``, ranks the sentences by cosine similarity to it.

Input: ``{"sentences": [str, ...], "query": str (optional)}``.
Output: ``{"embeddings": [[float]*384, ...], "similarity": [float, ...] (with query),
"ranking": [index, ...] (with query)}``.

Tokenisation uses the ``tokenizers`` library when it is installed, else a small
WordPiece over ``vocab.txt`` (identical ids for ordinary English text).
"""

from __future__ import annotations

import json
import math
import os
import unicodedata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

MAX_SENTENCES = 256


class WordPiece:
    """BERT's uncased basic tokenizer + greedy longest-match WordPiece."""

    def __init__(self, vocab_path: Path, max_len: int) -> None:
        words = vocab_path.read_text(encoding="utf-8").splitlines()
        self.vocab = {w: i for i, w in enumerate(words)}
        self.max_len = max_len
        self.cls, self.sep, self.unk = (self.vocab[t] for t in ("[CLS]", "[SEP]", "[UNK]"))

    def _basic(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        out: list[str] = []
        word = ""
        for c in text:
            cat = unicodedata.category(c)
            if c.isspace() or cat.startswith("C"):
                if word:
                    out.append(word)
                word = ""
            elif cat.startswith("P") or (33 <= ord(c) <= 47 or 58 <= ord(c) <= 64
                                         or 91 <= ord(c) <= 96 or 123 <= ord(c) <= 126):
                if word:
                    out.append(word)
                out.append(c)
                word = ""
            else:
                word += c
        if word:
            out.append(word)
        return out

    def _wordpiece(self, word: str) -> list[int]:
        ids: list[int] = []
        start = 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return [self.unk]
            start = end
        return ids

    def encode(self, text: str) -> list[int]:
        ids = [i for w in self._basic(text) for i in self._wordpiece(w)]
        return [self.cls, *ids[: self.max_len - 2], self.sep]


class Model:
    def __init__(self, **kwargs: Any) -> None:
        self._weights = kwargs.get("weights")
        self._config = kwargs.get("config") or {}
        self.params: dict[str, torch.Tensor] = {}

    def load(self) -> None:
        if self._weights is not None:
            folder = Path(self._weights.dir)
            self.device = torch.device(self._weights.device)
            self.params = self._weights.load("model.safetensors")
        else:  # run outside bdn: plain files, plain safetensors
            from safetensors.torch import load_file

            folder = Path(os.environ["MINILM_DIR"])
            self.device = torch.device("cpu")
            self.params = load_file(str(folder / "model.safetensors"))
        cfg = json.loads((folder / "config.json").read_text())
        self.heads = int(cfg["num_attention_heads"])
        self.layers = int(cfg["num_hidden_layers"])
        self.eps = float(cfg["layer_norm_eps"])
        max_len = 256
        st_cfg = folder / "sentence_bert_config.json"
        if st_cfg.is_file():
            max_len = int(json.loads(st_cfg.read_text()).get("max_seq_length", max_len))
        self.tokenizer = self._tokenizer(folder, max_len)

    def _tokenizer(self, folder: Path, max_len: int) -> Any:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            return WordPiece(folder / "vocab.txt", max_len)
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tok.no_padding()
        tok.enable_truncation(max_length=max_len)
        return tok

    def _ids(self, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.tokenizer, WordPiece):
            rows = [self.tokenizer.encode(s) for s in sentences]
        else:
            rows = [e.ids for e in self.tokenizer.encode_batch(sentences)]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        return ids.to(self.device), mask.to(self.device)

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        p = self.params
        return F.layer_norm(x, x.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"], self.eps)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.params[f"{name}.weight"], self.params[f"{name}.bias"])

    @torch.inference_mode()
    def embed(self, sentences: list[str]) -> torch.Tensor:
        p = self.params
        ids, mask = self._ids(sentences)
        b, t = ids.shape
        pos = torch.arange(t, device=self.device)
        x = (p["embeddings.word_embeddings.weight"][ids]
             + p["embeddings.position_embeddings.weight"][pos]
             + p["embeddings.token_type_embeddings.weight"][0])
        x = self._ln(x, "embeddings.LayerNorm")
        attn_mask = mask[:, None, None, :]  # keys that are padding get no attention
        d = x.shape[-1] // self.heads
        for i in range(self.layers):
            pre = f"encoder.layer.{i}"

            def heads(name: str, x: torch.Tensor = x, pre: str = pre) -> torch.Tensor:
                return self._linear(x, f"{pre}.attention.self.{name}").view(
                    b, t, self.heads, d).transpose(1, 2)

            ctx = F.scaled_dot_product_attention(heads("query"), heads("key"), heads("value"),
                                                 attn_mask=attn_mask,
                                                 scale=1.0 / math.sqrt(d))
            ctx = ctx.transpose(1, 2).reshape(b, t, self.heads * d)
            x = self._ln(x + self._linear(ctx, f"{pre}.attention.output.dense"),
                         f"{pre}.attention.output.LayerNorm")
            h = F.gelu(self._linear(x, f"{pre}.intermediate.dense"))
            x = self._ln(x + self._linear(h, f"{pre}.output.dense"), f"{pre}.output.LayerNorm")
        m = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)

    def predict(self, model_input: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(model_input, dict):
            raise ValueError('expected {"sentences": [...], "query": "..."}')
        sentences = model_input.get("sentences")
        if isinstance(sentences, str):
            sentences = [sentences]
        if (not isinstance(sentences, list) or not sentences
                or not all(isinstance(s, str) for s in sentences)):
            raise ValueError('"sentences" must be a non-empty list of strings')
        if len(sentences) > MAX_SENTENCES:
            raise ValueError(f"at most {MAX_SENTENCES} sentences per request")
        query = model_input.get("query")
        texts = [*sentences, query] if isinstance(query, str) else sentences
        emb = self.embed(texts)
        out: dict[str, Any] = {"embeddings": emb[: len(sentences)].cpu().tolist()}
        if isinstance(query, str):
            sims = emb[: len(sentences)] @ emb[-1]
            out["similarity"] = sims.cpu().tolist()
            out["ranking"] = torch.argsort(sims, descending=True).cpu().tolist()
        return out
