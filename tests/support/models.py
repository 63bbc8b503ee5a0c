"""Synthetic safetensors models for tests: Llama-shaped names, real files.

Tensors are filled from a seeded generator so two calls with the same arguments write
the same bytes, and a "fine-tune" differs only in the tensors it names.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

DTYPE = np.float16


def llama_tensors(layers: int = 2, hidden: int = 256, vocab: int = 1024,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """An ordered dict of Llama-like tensor names → arrays."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}

    def t(name: str, *shape: int) -> None:
        out[name] = rng.standard_normal(shape, dtype=np.float32).astype(DTYPE)

    t("model.embed_tokens.weight", vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}"
        t(f"{p}.input_layernorm.weight", hidden)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t(f"{p}.self_attn.{proj}.weight", hidden, hidden)
        t(f"{p}.post_attention_layernorm.weight", hidden)
        for proj, shape in (("gate_proj", (hidden * 2, hidden)), ("up_proj", (hidden * 2, hidden)),
                            ("down_proj", (hidden, hidden * 2))):
            t(f"{p}.mlp.{proj}.weight", *shape)
    t("model.norm.weight", hidden)
    t("lm_head.weight", vocab, hidden)
    return out


def write_sharded(root: Path, tensors: dict[str, np.ndarray], shards: int = 1,
                  prefix: str = "model") -> list[Path]:
    """Write tensors into ``shards`` files (+ an index json when sharded)."""
    root.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        path = root / f"{prefix}.safetensors"
        save_file({n: tensors[n] for n in names}, str(path))
        return [path]
    total = sum(a.nbytes for a in tensors.values())
    per = total / shards
    groups: list[list[str]] = [[]]
    acc = 0
    for n in names:
        if acc >= per * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(n)
        acc += tensors[n].nbytes
    paths, weight_map = [], {}
    for i, group in enumerate(groups):
        fname = f"{prefix}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(root / fname))
        paths.append(root / fname)
        weight_map.update({n: fname for n in group})
    (root / f"{prefix}.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return paths


def write_model_dir(root: Path, *, layers: int = 2, hidden: int = 256, shards: int = 1,
                    seed: int = 0, changed: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """A model folder: safetensors shards, config and tokenizer files, nested extras."""
    tensors = llama_tensors(layers=layers, hidden=hidden, seed=seed)
    rng = np.random.default_rng(seed + 1000)
    for name in changed:
        tensors[name] = rng.standard_normal(tensors[name].shape).astype(DTYPE)
    write_sharded(root, tensors, shards=shards)
    (root / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
         "num_hidden_layers": layers}, indent=2))
    (root / "tokenizer.json").write_text(json.dumps(
        {"model": {"vocab": {f"tok{i}": i for i in range(500)}}}))
    (root / "tokenizer_config.json").write_text('{"model_max_length": 2048}')
    (root / "nested" / "deeper").mkdir(parents=True, exist_ok=True)
    (root / "nested" / "deeper" / "notes.txt").write_text("hello\n")
    (root / "empty.txt").write_bytes(b"")
    return tensors
