"""`stage-model`: the one command that reaches the hub. The hub is faked; what is asked of it, and how each way it
can fail maps to an exit code, is what is checked."""

from __future__ import annotations

import json

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

from investment_risk.cli import main

from .conftest import assert_json_stdout


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """snapshot_download as the hub would answer: a snapshot folder with what was allowed, and the same folder when
    asked offline afterwards. Records each call's keyword arguments."""
    snapshot = tmp_path / "snapshots" / "0123abcd"
    calls: list[dict] = []

    def download(repo, **kwargs):
        calls.append({"repo": repo, **kwargs})
        if not kwargs.get("local_files_only"):
            snapshot.mkdir(parents=True, exist_ok=True)
            (snapshot / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
            (snapshot / "model.safetensors").write_bytes(b"weights")
        elif not snapshot.exists():
            raise LocalEntryNotFoundError("not in the cache")
        return str(snapshot)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return calls


def test_stage_model_fetches_safetensors_config_and_tokenizer_only(fake_hub, runner):
    result = runner.invoke(main, ["stage-model", "--base-model", "qwen2.5-1.5b"])
    assert result.exit_code == 0, result.output
    [event] = [e for e in assert_json_stdout(result) if e["event"] == "base_model_staged"]
    assert event["revision"] == "0123abcd" and event["path"].endswith("snapshots/0123abcd")
    fetch, offline = fake_hub
    assert fetch["repo"] == "Qwen/Qwen2.5-1.5B" and not fetch.get("local_files_only")
    allowed = fetch["allow_patterns"]
    assert "*.safetensors" in allowed and "tokenizer.json" in allowed and "config.json" in allowed
    assert not any(p.endswith((".bin", ".pt", ".pth", ".py")) or p == "*" for p in allowed)
    assert offline["local_files_only"]  # then found as train finds it


def hub_error(kind: type, message: str) -> Exception:
    """The hub's HTTP errors need a live response to construct: made without one, the message is all they carry."""
    error = kind.__new__(kind)
    Exception.__init__(error, message)
    return error


@pytest.mark.parametrize("failure, exit_code, message", [
    (LocalEntryNotFoundError("Name or service not known"), 1, "could not download Qwen/Qwen2.5-1.5B"),
    (hub_error(RepositoryNotFoundError, "404 Repository Not Found for url"), 2, "404 Repository Not Found"),
])
def test_stage_model_failures_map_to_retry_or_not(fake_hub, runner, monkeypatch, failure, exit_code, message):
    def fail(repo, **kwargs):
        raise failure
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    result = runner.invoke(main, ["stage-model"])
    assert result.exit_code == exit_code and message in result.output, result.output


def test_stage_model_refuses_offline_mode_and_local_models(fake_hub, runner, monkeypatch, tmp_path):
    result = runner.invoke(main, ["stage-model", "--base-model", "minilm"])
    assert result.exit_code == 2 and "needs no staging" in result.output, result.output
    result = runner.invoke(main, ["stage-model", "--base-model", str(tmp_path)])
    assert result.exit_code == 2 and "needs no staging" in result.output, result.output
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = runner.invoke(main, ["stage-model"])
    assert result.exit_code == 2 and "HF_HUB_OFFLINE is set" in result.output, result.output
    assert not fake_hub
