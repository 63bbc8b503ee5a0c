"""``config.yaml`` verdicts as ``truss`` 0.18 gives them: a differential test.

Every case is a ``config.yaml`` text, written to a file and read by both parsers: bdn's
:func:`bdn.config.load_model_config` and Truss's own ``TrussConfig.from_yaml`` followed
by ``validate_forbid_extra()`` (what ``truss push`` checks). Both must accept, or both
refuse; when both refuse and Truss's error names a place (``weights.1.auth``), bdn's
message must name the same entry and field (its wording may differ, and is often more
precise).

Where bdn's verdict differs on purpose, the case is listed in :data:`EXCEPTIONS` with the
reason, and the test checks that the difference is exactly that one.
"""

from __future__ import annotations

import logging
import textwrap
import warnings
from pathlib import Path

import pytest

from bdn.config import load_model_config
from bdn.errors import ConfigError

SHA = "0123456789abcdef0123456789abcdef01234567"


def w(body: str) -> str:
    """A config with one weights entry whose fields are ``body`` (YAML lines)."""
    return "weights:\n  - " + "\n    ".join(body.strip("\n").split("\n")) + "\n"


def src(source: str, extra_fields: str = "") -> str:
    """One entry with ``source``, a mount location and ``extra_fields`` (YAML lines)."""
    return w(f"source: {source}\nmount_location: /models/m"
             + (f"\n{extra_fields}" if extra_fields else ""))


CASES: dict[str, str] = {
    # -- schemes and source forms ----------------------------------------------------------
    "hf": src("hf://meta-llama/Llama-3.1-8B"),
    "hf_rev_main": src("hf://meta-llama/Llama-3.1-8B@main"),
    "hf_rev_sha": src(f"hf://org/repo@{SHA}"),
    "hf_rev_refs_pr": src("hf://org/repo@refs/pr/1"),
    "hf_rev_tag_dots": src("hf://org/repo@v1.0.2"),
    "hf_single_name": src("hf://gpt2"),
    "hf_three_parts": src("hf://a/b/c"),
    "hf_empty": src("hf://"),
    "hf_leading_slash": src("hf:///org/repo"),
    "hf_empty_rev": src("hf://org/repo@"),
    "hf_double_at": src("hf://org/repo@x@y"),
    "hf_rev_dotdot": src("hf://org/repo@../x"),
    "s3": src("s3://bucket/models/x"),
    "s3_bucket_only": src("s3://bucket"),
    "s3_empty": src("s3://"),
    "s3_leading_slash": src("s3:///bucket"),
    "s3_at_rev": src("s3://bucket/x@v1"),
    "s3_dotdot": src("s3://bucket/a/../b"),
    "gs": src("gs://bucket/path/to/model"),
    "gs_at_rev": src("gs://bucket/x@v1"),
    "r2": src("r2://account.bucket/path"),
    "cw": src("cw://bucket/path"),
    "cw_at_rev": src("cw://bucket/path@v2"),
    "azure": src("azure://account/container/path"),
    "azure_empty": src("azure://"),
    "https": src("https://example.com/models/model.bin"),
    "https_no_host": src("https:///model.bin"),
    "http": src("http://example.com/model.bin"),
    "ftp": src("ftp://example.com/x"),
    "no_scheme": src("meta-llama/Llama-3.1-8B"),
    "upper_scheme": src("HF://org/repo"),
    "mixed_case_scheme": src("S3://bucket/x"),
    "file": src("file:///data/models/m"),
    "file_relative": src("file://relative/dir"),
    "source_spaces": src('" hf://org/repo"'),
    "source_int": src("5"),
    "source_empty": src('""'),
    "source_null": src("null"),
    "source_list": src("[hf://org/repo]"),
    "source_missing": w("mount_location: /models/m"),
    # -- patterns --------------------------------------------------------------------------
    "allow_list": src("hf://org/repo", 'allow_patterns: ["*.safetensors", "config.json"]'),
    "ignore_list": src("hf://org/repo", 'ignore_patterns: ["*.bin", "original/*"]'),
    "allow_string": src("hf://org/repo", 'allow_patterns: "*.json"'),
    "ignore_string": src("hf://org/repo", 'ignore_patterns: "*.bin"'),
    "allow_empty_list": src("hf://org/repo", "allow_patterns: []"),
    "allow_null": src("hf://org/repo", "allow_patterns: null"),
    "allow_int_item": src("hf://org/repo", "allow_patterns: [1]"),
    "allow_dict": src("hf://org/repo", "allow_patterns: {a: 1}"),
    "allow_empty_pattern": src("hf://org/repo", 'allow_patterns: [""]'),
    "allow_deep_pattern": src("hf://org/repo", 'allow_patterns: ["**/*.json", "sub/"]'),
    "allow_empty_range": src("hf://org/repo", 'allow_patterns: ["[z-a]"]'),
    "allow_and_ignore": src("hf://org/repo",
                            'allow_patterns: ["*"]\nignore_patterns: ["*.md", ".*"]'),
    # -- auth ------------------------------------------------------------------------------
    "secret_top": src("hf://org/repo", "auth_secret_name: hf_access_token"),
    "secret_top_empty": src("hf://org/repo", 'auth_secret_name: ""'),
    "secret_top_int": src("hf://org/repo", "auth_secret_name: 5"),
    "secret_dots_dashes": src("hf://org/repo", "auth_secret_name: my-org.hf_token-2"),
    "secret_namespaced": src("hf://org/repo", "auth_secret_name: team-a/hf"),
    "secret_space": src("hf://org/repo", 'auth_secret_name: "bad name"'),
    "secret_dotdot": src("hf://org/repo", 'auth_secret_name: ".."'),
    "custom_secret": src("hf://org/repo",
                         "auth: {auth_method: CUSTOM_SECRET, auth_secret_name: tok}"),
    "custom_secret_lower": src("hf://org/repo",
                               "auth: {auth_method: custom_secret, auth_secret_name: tok}"),
    "custom_secret_mixed": src("hf://org/repo",
                               "auth: {auth_method: Custom_Secret, auth_secret_name: tok}"),
    "custom_secret_missing_name": src("hf://org/repo", "auth: {auth_method: CUSTOM_SECRET}"),
    "custom_secret_empty_other": src(
        "hf://org/repo",
        'auth: {auth_method: CUSTOM_SECRET, auth_secret_name: tok, aws_oidc_region: ""}'),
    "custom_secret_with_region": src(
        "hf://org/repo",
        "auth: {auth_method: CUSTOM_SECRET, auth_secret_name: tok, aws_oidc_region: x}"),
    "both_secret_names": src(
        "hf://org/repo",
        "auth_secret_name: a\nauth: {auth_method: CUSTOM_SECRET, auth_secret_name: b}"),
    "top_secret_with_oidc": src(
        "s3://bucket/x",
        "auth_secret_name: a\nauth: {auth_method: AWS_OIDC, aws_oidc_role_arn: r, "
        "aws_oidc_region: us-east-1}"),
    "aws_oidc": src("s3://bucket/x", "auth:\n  auth_method: AWS_OIDC\n"
                    "  aws_oidc_role_arn: arn:aws:iam::123456789012:role/r\n"
                    "  aws_oidc_region: us-east-1"),
    "aws_oidc_lower": src("s3://bucket/x", "auth: {auth_method: aws_oidc, "
                          "aws_oidc_role_arn: arn:aws:iam::1:role/r, aws_oidc_region: eu}"),
    "aws_oidc_missing_region": src("s3://bucket/x", "auth: {auth_method: AWS_OIDC, "
                                   "aws_oidc_role_arn: r}"),
    "aws_oidc_empty_role": src("s3://bucket/x", 'auth: {auth_method: AWS_OIDC, '
                               'aws_oidc_role_arn: "", aws_oidc_region: us-east-1}'),
    "aws_oidc_int_role": src("s3://bucket/x", "auth: {auth_method: AWS_OIDC, "
                             "aws_oidc_role_arn: 5, aws_oidc_region: us-east-1}"),
    "aws_oidc_with_secret": src("s3://bucket/x", "auth: {auth_method: AWS_OIDC, "
                                "aws_oidc_role_arn: r, aws_oidc_region: u, "
                                "auth_secret_name: s}"),
    "gcp_oidc": src("gs://bucket/x", "auth: {auth_method: GCP_OIDC, "
                    "gcp_oidc_service_account: sa@p.iam.gserviceaccount.com, "
                    "gcp_oidc_workload_id_provider: projects/1/locations/global/x}"),
    "gcp_oidc_missing_provider": src("gs://bucket/x", "auth: {auth_method: GCP_OIDC, "
                                     "gcp_oidc_service_account: sa}"),
    "gcp_oidc_with_aws_field": src("gs://bucket/x", "auth: {auth_method: GCP_OIDC, "
                                   "gcp_oidc_service_account: sa, "
                                   "gcp_oidc_workload_id_provider: p, aws_oidc_region: u}"),
    "assume_role": src("s3://bucket/x", "auth: {auth_method: AWS_ASSUME_ROLE, "
                       "aws_assume_role_arn: arn:aws:iam::1:role/r, "
                       "aws_assume_role_region: us-west-2}"),
    "assume_role_lower": src("s3://bucket/x", "auth: {auth_method: aws_assume_role, "
                             "aws_assume_role_arn: r, aws_assume_role_region: u}"),
    "assume_role_missing_region": src("s3://bucket/x", "auth: {auth_method: AWS_ASSUME_ROLE, "
                                      "aws_assume_role_arn: r}"),
    "assume_role_with_oidc": src("s3://bucket/x", "auth: {auth_method: AWS_ASSUME_ROLE, "
                                 "aws_assume_role_arn: r, aws_assume_role_region: u, "
                                 "aws_oidc_role_arn: o}"),
    "oidc_with_assume_field": src("s3://bucket/x", "auth: {auth_method: AWS_OIDC, "
                                  "aws_oidc_role_arn: r, aws_oidc_region: u, "
                                  "aws_assume_role_region: x}"),
    "auth_unknown_method": src("hf://org/repo", "auth: {auth_method: NOPE}"),
    "auth_method_missing": src("hf://org/repo", "auth: {auth_secret_name: tok}"),
    "auth_method_int": src("hf://org/repo", "auth: {auth_method: 3}"),
    "auth_extra_field": src("hf://org/repo", "auth: {auth_method: CUSTOM_SECRET, "
                            "auth_secret_name: tok, token: x}"),
    "auth_string": src("hf://org/repo", "auth: CUSTOM_SECRET"),
    "auth_null": src("hf://org/repo", "auth: null"),
    # -- mount locations -------------------------------------------------------------------
    "mount_relative": w("source: hf://org/repo\nmount_location: models/m"),
    "mount_missing": w("source: hf://org/repo"),
    "mount_empty": w('source: hf://org/repo\nmount_location: ""'),
    "mount_int": w("source: hf://org/repo\nmount_location: 5"),
    "mount_trailing_slash": w("source: hf://org/repo\nmount_location: /models/m/"),
    "mount_double_slash": w("source: hf://org/repo\nmount_location: //models/m"),
    "mount_root": w("source: hf://org/repo\nmount_location: /"),
    "mount_dotdot": w("source: hf://org/repo\nmount_location: /models/../etc"),
    "mounts_two": ("weights:\n  - {source: hf://org/a, mount_location: /models/a}\n"
                   "  - {source: s3://bucket/b, mount_location: /models/b}\n"),
    "mounts_duplicate": ("weights:\n  - {source: hf://org/a, mount_location: /models/a}\n"
                         "  - {source: hf://org/b, mount_location: /models/a}\n"),
    "mounts_duplicate_normalised": (
        "weights:\n  - {source: hf://org/a, mount_location: /models/a}\n"
        "  - {source: hf://org/b, mount_location: /models/a/}\n"),
    "mounts_nested": ("weights:\n  - {source: hf://org/a, mount_location: /models}\n"
                      "  - {source: hf://org/b, mount_location: /models/b}\n"),
    "mounts_common_prefix": ("weights:\n  - {source: hf://org/a, mount_location: /models/a}\n"
                             "  - {source: hf://org/b, mount_location: /models/ab}\n"),
    # -- the weights list ------------------------------------------------------------------
    "weights_null": "weights: null\n",
    "weights_bare_key": "weights:\n",
    "weights_empty": "weights: []\n",
    "weights_mapping": "weights: {source: hf://org/repo, mount_location: /m}\n",
    "weights_string": "weights: hf://org/repo\n",
    "weights_entry_string": "weights:\n  - hf://org/repo\n",
    "weights_entry_unknown": src("hf://org/repo", "revision: main"),
    # -- the rest of config.yaml -----------------------------------------------------------
    "model_cache_and_weights": (src("hf://org/repo")
                                + "model_cache:\n  - {repo_id: org/repo, use_volume: false}\n"),
    "model_cache_alone": "model_cache:\n  - {repo_id: org/repo, use_volume: false}\n",
    "hf_cache_and_weights": (src("hf://org/repo")
                             + "hf_cache:\n  - {repo_id: org/repo, use_volume: false}\n"),
    "runtime_concurrency": "runtime:\n  predict_concurrency: 4\n",
    "runtime_concurrency_string": "runtime:\n  predict_concurrency: '4'\n",
    "runtime_concurrency_word": "runtime:\n  predict_concurrency: four\n",
    "runtime_concurrency_zero": "runtime:\n  predict_concurrency: 0\n",
    "runtime_not_mapping": "runtime: 5\n",
    "top_level_concurrency": "predict_concurrency: 4\n",
    "secrets_nulls": "secrets:\n  hf_access_token: null\n  api_key: placeholder\n",
    "secrets_list": "secrets: [hf_access_token]\n",
    "secrets_int_value": "secrets:\n  api_key: 5\n",
    "environment_variables": "environment_variables: {A: 1, B: true, C: text}\n",
    "model_name_int": "model_name: 5\n",
    "model_metadata": "model_metadata: {example_model_input: {prompt: hi}}\n",
    "requirements": "requirements: [torch, 'transformers==4.44.0']\n",
    "requirements_string": "requirements: torch\n",
    "external_package_dirs": "external_package_dirs: [../shared]\n",
    "model_class_name": "model_class_name: Predictor\nmodel_module_dir: src\n",
    "empty_document": "",
    "duplicate_key": "model_name: a\nmodel_name: b\n",
    "duplicate_weights_key": src("hf://org/a") + "weights: []\n",
    "full_example": textwrap.dedent("""\
        model_name: llama
        python_version: py311
        requirements: [vllm]
        resources: {accelerator: H100, use_gpu: true}
        secrets: {hf_access_token: null}
        runtime: {predict_concurrency: 32}
        weights:
          - source: hf://meta-llama/Llama-3.1-8B-Instruct@main
            mount_location: /models/llama
            allow_patterns: ["*.safetensors", "*.json"]
            ignore_patterns: ["original/*"]
            auth: {auth_method: custom_secret, auth_secret_name: hf_access_token}
          - source: s3://bucket/adapters
            mount_location: /models/adapters
            auth: {auth_method: aws_oidc, aws_oidc_role_arn: r, aws_oidc_region: us-east-1}
        """),
}

# Cases where bdn's verdict differs from Truss's on purpose: case -> (bdn accepts?, why).
EXCEPTIONS: dict[str, tuple[bool, str]] = {
    "file": (True, "file:// is bdn's local-folder source (the embedded default); Truss "
                   "has no local source"),
    "top_level_concurrency": (True, "bdn read predict_concurrency at the top level before "
                                    "it read runtime.predict_concurrency; accepted with a "
                                    "DeprecationWarning so existing folders keep working"),
    "hf_three_parts": (False, "a Hugging Face repository id is owner/name; a third part "
                              "can only fail later, on a node"),
    "hf_empty_rev": (False, "an empty revision after @ is a typo; bdn pins revisions, so "
                            "it refuses to guess one"),
    "hf_double_at": (False, "the repository part would contain '@': not a repository id"),
    "hf_rev_dotdot": (False, "'..' in a revision is refused: revisions become store keys"),
    "s3_dotdot": (False, "'.'/'..' segments in a source path are refused (containment of "
                         "mirrored paths)"),
    "secret_space": (False, "secret names follow Truss's own rule for secret names "
                            "(Build.validate_secret_name, Kubernetes object names): the "
                            "name becomes a file under the secrets folder and an "
                            "environment variable"),
    "secret_dotdot": (False, "as secret_space: '..' would name the secrets folder's parent"),
    "allow_empty_range": (False, "a pattern that cannot match anything ([z-a]) is a typo; "
                                 "refused with the pattern and its offset"),
    "top_secret_with_oidc": (False, "the top-level auth_secret_name would be ignored by an "
                                    "OIDC auth block; bdn refuses the ambiguity"),
    "mount_root": (False, "mounting weights over / would shadow the whole filesystem"),
    "mount_dotdot": (False, "'..' in a mount location escapes where it appears to point"),
    "mounts_duplicate_normalised": (False, "/models/a and /models/a/ are the same folder: "
                                           "two entries would write into one mount"),
    "mounts_nested": (False, "a mount inside another would hide or mix the other's files"),
    "runtime_concurrency_zero": (False, "a predict_concurrency of 0 admits no request at "
                                        "all"),
}


def truss_verdict(path: Path) -> tuple[bool, tuple[object, ...] | None, str]:
    """(accepted, the location Truss's error names or None, the error text)."""
    import pydantic
    from truss.base.truss_config import TrussConfig

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            TrussConfig.from_yaml(path).validate_forbid_extra()
    except pydantic.ValidationError as e:
        return False, tuple(e.errors()[0]["loc"]), str(e)
    except Exception as e:  # some of its refusals are crashes (runtime: 5)
        return False, None, f"{type(e).__name__}: {e}"
    return True, None, ""


def bdn_verdict(path: Path) -> tuple[bool, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_model_config(path)
    except ConfigError as e:
        return False, str(e)
    return True, ""


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 80
    assert set(EXCEPTIONS) <= set(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bdn_and_truss_agree(case: str, tmp_path: Path) -> None:
    logging.getLogger("truss").setLevel(logging.ERROR)
    path = tmp_path / "config.yaml"
    path.write_text(CASES[case])
    t_ok, t_loc, t_err = truss_verdict(path)
    b_ok, b_err = bdn_verdict(path)
    if case in EXCEPTIONS:
        expected, why = EXCEPTIONS[case]
        assert b_ok == expected and t_ok != expected, \
            f"{case}: listed as an exception ({why}) but bdn={b_ok} truss={t_ok}: {b_err}"
        return
    assert b_ok == t_ok, f"{case}: bdn {'accepts' if b_ok else 'refuses: ' + b_err}; " \
                         f"truss {'accepts' if t_ok else 'refuses: ' + t_err}"
    if b_ok or not t_loc:
        return
    # Both refuse: bdn names the same entry and field.
    if t_loc[0] == "weights" and len(t_loc) >= 2 and isinstance(t_loc[1], int):
        assert f"weights[{t_loc[1]}]" in b_err, (t_loc, b_err)
        named = [p for p in t_loc[2:] if isinstance(p, str)]
        if named:
            assert named[0] in b_err, (t_loc, b_err)
    else:
        assert str(t_loc[-1] if isinstance(t_loc[-1], str) else t_loc[0]) in b_err, \
            (t_loc, b_err)
