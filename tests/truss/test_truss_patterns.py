"""``allow_patterns``/``ignore_patterns`` select what ``huggingface_hub`` selects.

A differential test: the same tree of nested paths and the same patterns go through
:func:`bdn.patterns.select` and ``huggingface_hub.utils.filter_repo_objects`` (what
``snapshot_download`` and truss-transfer use), and the selections must be equal — for
each pattern alone, as allow and as ignore, for combinations, and for random patterns
and paths (hypothesis). The only patterns left out are those bdn refuses at parse time
(:data:`REFUSED`, each with its reason); the test checks that they are refused.
"""

from __future__ import annotations

import itertools
import random

import pytest
from huggingface_hub.utils import filter_repo_objects
from hypothesis import given, settings
from hypothesis import strategies as st

from bdn.patterns import PatternError, compile_glob, matches, select

TREE = [
    "config.json", "generation_config.json", "model.safetensors", "README.md", ".gitattributes",
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "merges.txt",
    "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
    "model.safetensors.index.json", "pytorch_model.bin", "original/consolidated.00.pth",
    "original/params.json", "original/tokenizer.model", "onnx/model.onnx",
    "onnx/model_quantized.onnx", "sub/config.json", "sub/deeper/config.json",
    "sub/deeper/weights.bin", "1_Pooling/config.json", "2_Dense/model.safetensors",
    "a/b/c/d/e.json", "a.json/inner.txt", ".cache/huggingface/x", "docs/.hidden/x.md",
    "imgs/[draft].png", "imgs/a b.png", "imgs/ünï.png", "v1.0/model.gguf",
    "model-q4_k_m.gguf", "model-Q8_0.gguf", "flax_model.msgpack", "tf_model.h5",
    "x", "xy", "x/y", "-", "]", "!", "a", "a/", "b/a", "ab",
]

PATTERNS = [
    "*", "*.json", "**/*.json", "*/*.json", "*.safetensors", "model*.safetensors",
    "model-*-of-*.safetensors", "*.bin", "*.md", "*.txt", "sub/*", "sub/", "sub/**",
    "sub/*/config.json", "sub/**/config.json", "original/*", "original/", "onnx/*.onnx",
    "*/model.onnx", "config.json", "/config.json", "sub", "a/b", "a/**", "**", "**/",
    "**/*", "*/", "?", "??", "x?y", "x/?", "?/*", "[ab]", "[!ab]", "[^ab]", "[a-c]*",
    "[]]", "[!]]", "[-a]", "[a-]", "*.[jm][sd]*", "*[0-9].safetensors",
    "*-0000[12]-of-*", "*.gguf", "*q4*", "*Q[0-9]_0*", "*[!.]", ".*", "*/.*", "*/.*/*",
    "*.h5", "*.msgpack", "*.onnx", "imgs/[[]draft].png", "imgs/*", "imgs/a b.png",
    "*ü*", "v1.0/*", "v1?0/*", "*.pth", "*/tokenizer.model", "tokenizer*",
    "*tokenizer*", "1_Pooling/*", "[0-9]_*/*", "a.json", "a.json/*", "*json*", "*/",
    "a/*/c/*/*.json", "**/e.json", "x*", "*y", "a*b", "[x]", "[x]/[y]", "sub\\config.json",
    "sub\\", "*\\*.json", "", "x/", "[/]", "*[/]*", "a[/]b",
]

# Patterns fnmatch would take and bdn refuses, with the reason (they are almost surely
# typos and can never select what the user meant).
REFUSED = {
    "[z-a]": "an empty range: a class that matches nothing (fnmatch: never matches)",
    "a[bc": "an unterminated class (fnmatch: a literal '[')",
    "[!]": "an unterminated class (fnmatch: the literal '[!]')",
    "[": "an unterminated class (fnmatch: a literal '[')",
    "x" * 1025: "longer than MAX_PATTERN_CHARS",
}


def hub(paths: list[str], allow: list[str] | None, ignore: list[str] | None) -> list[str]:
    return list(filter_repo_objects(paths, allow_patterns=allow, ignore_patterns=ignore))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_each_pattern_selects_what_huggingface_hub_selects(pattern: str) -> None:
    assert select(TREE, [pattern]) == hub(TREE, [pattern], None), pattern
    assert select(TREE, None, [pattern]) == hub(TREE, None, [pattern]), pattern


def test_star_crosses_slash() -> None:
    assert matches("sub/config.json", "*.json")
    assert select(TREE, ["*.json"]) == [p for p in TREE if p.endswith(".json")]
    assert not matches("config.json", "**/*.json")  # as in fnmatch: "/" is required


def test_combinations_of_allow_and_ignore() -> None:
    rng = random.Random(18)
    for _ in range(400):
        allow = rng.sample(PATTERNS, rng.randint(1, 3))
        ignore = rng.sample(PATTERNS, rng.randint(0, 3)) or None
        assert select(TREE, allow, ignore) == hub(TREE, allow, ignore), (allow, ignore)
    for allow, ignore in itertools.product([["*.json", "*.safetensors"], ["sub/"]],
                                           [["sub/*"], ["*.md", ".*"], None]):
        assert select(TREE, allow, ignore) == hub(TREE, allow, ignore)


@pytest.mark.parametrize("pattern", sorted(REFUSED))
def test_refused_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(PatternError):
        compile_glob(pattern)


_ALPHABET = "ab./*?[]!-^\\"


@settings(max_examples=400, deadline=None)
@given(pattern=st.text(_ALPHABET, max_size=8),
       paths=st.lists(st.text("ab./[]!-^", min_size=1, max_size=8), min_size=1, max_size=8))
def test_random_patterns_and_paths(pattern: str, paths: list[str]) -> None:
    try:
        compile_glob(pattern)
    except PatternError:
        return  # refused at parse time (see REFUSED); never reaches a selection
    assert select(paths, [pattern]) == hub(paths, [pattern], None), (pattern, paths)
