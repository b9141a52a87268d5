"""On a piped stdout every line a command writes is a JSON object; human summaries go to a terminal only.

The commands below run as a pipe sees them (CliRunner's stdout is not a terminal). `demo`, `report compare` and
the `jobs` commands are checked the same way in their own tests; `jobs render` prints manifests (a YAML document,
its product, like `kubectl kustomize`), not a log. A test walks the command tree so that a new command without
this check fails here.
"""

from __future__ import annotations

import click

from investment_risk.cli import main

from .conftest import TINY_TRAIN_ARGS, assert_json_stdout

CHECKED_ELSEWHERE = {"demo": "test_demo.py", "report compare": "test_compare.py", "jobs submit": "test_jobs.py",
                     "jobs status": "test_jobs.py", "jobs logs": "test_jobs.py", "jobs cancel": "test_jobs.py", "jobs wait": "test_jobs.py",
                     "jobs run-local": "test_jobs.py", "calibrate": "test_calibration.py",
                     "report dimensions": "test_calibration.py", "report drift": "test_drift.py",
                     "report batch": "test_batch_report.py", "stage-model": "test_stage_model.py"}
DOCUMENT_OUTPUT = {"jobs render"}
CHECKED_HERE = {"data synth", "data split", "train", "evaluate", "export", "score", "score-merge"}


def _leaves(group: click.Group, prefix: str = "") -> set[str]:
    names = set()
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        names |= _leaves(command, path + " ") if isinstance(command, click.Group) else {path}
    return names


def test_every_command_is_checked():
    assert _leaves(main) == CHECKED_HERE | set(CHECKED_ELSEWHERE) | DOCUMENT_OUTPUT


def test_the_pipeline_commands_write_only_json_to_a_pipe(runner, tmp_path, exported, split_dir):
    run, model, _ = exported
    steps = [
        ["data", "synth", "--rows", "60", "--out", str(tmp_path / "a.parquet")],
        ["data", "split", "--input", str(tmp_path / "a.parquet"), "--out", str(tmp_path / "split")],
        ["train", *TINY_TRAIN_ARGS, "--data", str(split_dir), "--out", str(tmp_path / "dry"), "--dry-run"],
        ["train", *TINY_TRAIN_ARGS, "--epochs", "1", "--data", str(split_dir), "--out", str(tmp_path / "run")],
        ["evaluate", "--model", str(model), "--data", str(split_dir / "test.parquet")],
        ["export", "--run", str(run), "--out", str(tmp_path / "model")],
        ["score", "--model", str(model), "--input", str(split_dir / "test.parquet"), "--out", str(tmp_path / "s")],
        ["score-merge", "--out", str(tmp_path / "s")],
    ]
    seen = set()
    for args in steps:
        result = runner.invoke(main, args)
        assert result.exit_code == 0, (args, result.output)
        events = assert_json_stdout(result)
        assert events, args  # the summary is there, as events
        # nor anything on stderr, which a pod's log holds too (NNCF drew its progress bars there in every export)
        assert not result.stderr, (args, result.stderr)
        seen |= {e["event"] for e in events}
    # The summaries that a terminal shows as text reach a pipe as events with the same figures.
    assert {"synth_written", "split_summary", "dry_run", "training_done", "evaluated", "exported", "score_summary",
            "metrics_merged"} <= seen
