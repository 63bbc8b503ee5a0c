"""The weights: section: Truss-like parsing and errors that name index and field."""

from __future__ import annotations

import pytest

from bdn.config import parse_model_config, parse_source, parse_weights
from bdn.errors import ConfigError
from bdn.patterns import select


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
    cfg = parse_model_config({"model_name": "x", "predict_concurrency": 4,
                              "weights": [{"source": "hf://a/b", "mount_location": "/w"}]})
    assert cfg.predict_concurrency == 4 and len(cfg.weights) == 1
    with pytest.raises(ConfigError, match="predict_concurrency"):
        parse_model_config({"predict_concurrency": 0})


def test_source_without_bucket() -> None:
    with pytest.raises(ConfigError, match="missing a bucket"):
        parse_source("s3://")


def test_glob_semantics() -> None:
    paths = ["config.json", "a/config.json", "a/b/c.json", "model.safetensors", "x.md"]
    assert select(paths, ["*.json"]) == ["config.json"]
    assert select(paths, ["**/*.json"]) == ["config.json", "a/config.json", "a/b/c.json"]
    assert select(paths, ["a/**"]) == ["a/config.json", "a/b/c.json"]
    assert select(paths, None, ["*.md", "a/**"]) == ["config.json", "model.safetensors"]
