"""The weights: section: Truss-like parsing and errors that name index and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from bdn.config import (
    ConfigDeprecationWarning,
    load_model_config,
    parse_model_config,
    parse_source,
    parse_weights,
)
from bdn.errors import ConfigError
from bdn.patterns import matches, select


def test_valid_entries_parse() -> None:
    w = parse_weights([
        {"source": "hf://meta-llama/Llama-3.1-8B@main", "mount_location": "/models/llama",
         "allow_patterns": ["*.safetensors"], "auth_secret_name": "hf_token"},
        {"source": "s3://bucket/models/x", "mount_location": "/models/x",
         "auth": {"auth_method": "AWS_OIDC", "aws_oidc_role_arn": "arn:aws:iam::1:role/r",
                  "aws_oidc_region": "us-east-1"}},
        {"source": "gs://b/p", "mount_location": "/models/g",
         "auth": {"auth_method": "GCP_OIDC", "gcp_oidc_service_account": "sa@x",
                  "gcp_oidc_workload_id_provider": "projects/1/x"}},
        {"source": "file:///tmp/m", "mount_location": "/models/local/"},
    ])
    assert w[0].source.revision == "main" and w[0].source.location == "meta-llama/Llama-3.1-8B"
    assert w[0].auth is not None and w[0].auth.auth_secret_name == "hf_token"
    assert w[1].source.bucket == "bucket" and w[1].source.prefix == "models/x"
    assert w[3].mount_location == "/models/local"


@pytest.mark.parametrize("entry,field,needle", [
    ({"source": "meta-llama/x", "mount_location": "/m"}, "source",
     "Source 'meta-llama/x' is missing a URI scheme. Supported schemes: hf://"),
    ({"source": "ftp://x/y", "mount_location": "/m"}, "source", "unsupported scheme"),
    ({"source": "s3://bucket/x@v1", "mount_location": "/m"}, "source",
     "The @ revision syntax is only valid for HuggingFace sources (hf://)"),
    ({"source": "hf://org/repo", "mount_location": "models"}, "mount_location",
     "mount_location must be an absolute path (start with /), got: models"),
    ({"source": "hf://org/repo", "mount_location": "/m", "auth_secret_name": "a",
      "auth": {"auth_method": "CUSTOM_SECRET", "auth_secret_name": "b"}}, "auth_secret_name",
     "cannot be combined"),
    ({"source": "hf://org/repo", "mount_location": "/m",
      "auth": {"auth_method": "AWS_OIDC", "aws_oidc_region": "x"}}, "auth.aws_oidc_role_arn",
     "is required when auth_method is AWS_OIDC"),
    ({"source": "hf://org/repo", "mount_location": "/m",
      "auth": {"auth_method": "CUSTOM_SECRET", "auth_secret_name": "s",
               "aws_oidc_region": "x"}}, "auth.aws_oidc_region", "is not allowed"),
    ({"source": "hf://org/repo", "mount_location": "/m", "auth": {"auth_method": "NOPE"}},
     "auth.auth_method", "must be one of"),
    ({"source": "hf://org/repo", "mount_location": "/m", "bogus": 1}, "", "unknown field"),
])
def test_bad_entries_name_index_and_field(entry: dict, field: str, needle: str) -> None:
    ok = {"source": "hf://a/b", "mount_location": "/ok"}
    with pytest.raises(ConfigError) as e:
        parse_weights([ok, entry])
    assert e.value.index == 1 and e.value.field == field
    assert needle in str(e.value) and "weights[1]" in str(e.value)


def test_mount_locations_unique_and_not_nested() -> None:
    with pytest.raises(ConfigError, match="already used by weights\\[0\\]"):
        parse_weights([{"source": "hf://a/b", "mount_location": "/m"},
                       {"source": "hf://a/c", "mount_location": "/m/"}])
    with pytest.raises(ConfigError, match="nested"):
        parse_weights([{"source": "hf://a/b", "mount_location": "/m"},
                       {"source": "hf://a/c", "mount_location": "/m/sub"}])


def test_model_config_fields() -> None:
    cfg = parse_model_config({"model_name": "x", "runtime": {"predict_concurrency": 4},
                              "weights": [{"source": "hf://a/b", "mount_location": "/w"}]})
    assert cfg.predict_concurrency == 4 and len(cfg.weights) == 1
    with pytest.raises(ConfigError, match=r"runtime\.predict_concurrency"):
        parse_model_config({"runtime": {"predict_concurrency": 0}})


def test_top_level_predict_concurrency_is_deprecated_but_read() -> None:
    with pytest.warns(ConfigDeprecationWarning, match="runtime:"):
        cfg = parse_model_config({"predict_concurrency": 3})
    assert cfg.predict_concurrency == 3
    with pytest.warns(ConfigDeprecationWarning):
        cfg = parse_model_config({"predict_concurrency": 3, "runtime": {"predict_concurrency": 5}})
    assert cfg.predict_concurrency == 5, "runtime's value wins"
    with pytest.warns(ConfigDeprecationWarning), pytest.raises(ConfigError, match="predict_conc"):
        parse_model_config({"predict_concurrency": 0})


def test_source_without_bucket() -> None:
    with pytest.raises(ConfigError, match="missing a bucket"):
        parse_source("s3://")


def test_glob_semantics() -> None:
    # As huggingface_hub and truss-transfer mean them: "*" crosses "/" (this reverses
    # bdn's earlier shell-like rule; tests/truss/test_truss_patterns.py compares with
    # huggingface_hub on many more cases).
    paths = ["config.json", "a/config.json", "a/b/c.json", "model.safetensors", "x.md"]
    assert select(paths, ["*.json"]) == ["config.json", "a/config.json", "a/b/c.json"]
    assert select(paths, ["**/*.json"]) == ["a/config.json", "a/b/c.json"]
    assert select(paths, ["a/**"]) == ["a/config.json", "a/b/c.json"]
    assert select(paths, ["a/"]) == ["a/config.json", "a/b/c.json"]
    assert select(paths, None, ["*.md", "a/*"]) == ["config.json", "model.safetensors"]


# -- config files that attack the reader ---------------------------------------------


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_yaml_alias_bomb_is_a_short_error(tmp_path: Path) -> None:
    # Billion laughs: nine levels of nine aliases each stand for 9^9 strings.
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    lines.append("environment_variables: {BOMB: *a9}")
    path = _config(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as e:
        load_model_config(path)
    assert "expands to more than" in str(e.value) and len(str(e.value)) < 400


def test_alias_bomb_in_a_quoted_field_is_quoted_briefly() -> None:
    # Parsed by someone else (the control API takes a document): the error still quotes
    # a bounded repr, not the expansion of every shared list.
    leaf: list[object] = ["lol"] * 9
    for _ in range(4):
        leaf = [leaf] * 9
    with pytest.raises(ConfigError) as e:
        parse_weights([{"source": "hf://a/b", "mount_location": "/m"}, leaf])
    assert "entry must be a mapping" in str(e.value) and len(str(e.value)) < 400


def test_huge_value_is_quoted_at_most_200_characters(tmp_path: Path) -> None:
    huge = "x" * 1_000_000
    path = _config(tmp_path, f"weights:\n  - source: {huge}\n    mount_location: /m\n")
    with pytest.raises(ConfigError) as e:
        load_model_config(path)
    assert "missing a URI scheme" in str(e.value) and len(str(e.value)) < 600
    path = _config(tmp_path, f"model_name: [{', '.join(['1'] * 50_000)}]\n")
    with pytest.raises(ConfigError) as e:
        load_model_config(path)
    assert "model_name must be a string" in str(e.value) and len(str(e.value)) < 400


def test_deep_nesting_is_a_clear_error(tmp_path: Path) -> None:
    for depth in (100, 100_000):  # deeper than our bound; deeper than Python's stack
        path = _config(tmp_path, "model_metadata: " + "[" * depth + "]" * depth + "\n")
        with pytest.raises(ConfigError) as e:
            load_model_config(path)
        assert "nested" in str(e.value) and len(str(e.value)) < 400


# -- glob patterns ---------------------------------------------------------------------


def test_glob_matching_is_linear_on_hostile_patterns() -> None:
    path = "/".join(["d"] * 200) + "/w.bin"
    for hostile in ("**/" * 300 + "x", "*d" * 400 + "x", "*/" * 150 + "x" + "?" * 100):
        assert not matches(path, hostile)  # a backtracking regex would not return


@pytest.mark.parametrize(("pattern", "needle"), [
    ("[z-a]", "empty character range z-a"),
    ("[!]", "unterminated character class"),
    ("a[bc", "unterminated character class"),
    ("a" * 10_000, "longer than 1024"),
])
def test_bad_patterns_name_the_field(pattern: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_weights([{"source": "hf://a/b", "mount_location": "/m",
                        "ignore_patterns": ["*.md", pattern]}])
    assert e.value.field == "ignore_patterns[1]" and needle in str(e.value)
    assert len(str(e.value)) < 300
