import json

import click
import pyarrow.parquet as pq
import pytest

from investment_risk.cli import main
from investment_risk.core.errors import InputError, RetryableError


def json_events(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_help_lists_commands_and_env_vars(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "data" in result.output and "--log-format" in result.output
    result = runner.invoke(main, ["data", "synth", "--help"])
    assert result.exit_code == 0 and "INVESTMENT_RISK_ROWS" in result.output


def test_synth_then_split_with_json_logs(runner, tmp_path):
    out = tmp_path / "x.parquet"
    result = runner.invoke(main, ["--log-format", "json", "data", "synth", "--rows", "120", "--seed", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    events = json_events(result.output)
    assert events[-1]["event"] == "synth_written" and events[-1]["rows"] == 120
    assert events[-1]["stage"] == "synth" and events[-1]["run_id"]
    assert pq.read_table(out).num_rows == 120
    result = runner.invoke(main, ["data", "split", "--input", str(out), "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "d").iterdir()} == {"train.parquet", "val.parquet", "test.parquet",
                                                            "_dropped.parquet", "split_summary.json"}


def test_synth_jsonl_output(runner, tmp_path):
    out = tmp_path / "x.jsonl"
    assert runner.invoke(main, ["data", "synth", "--rows", "5", "--out", str(out)]).exit_code == 0
    assert len(out.read_text().splitlines()) == 5


def test_options_come_from_env_vars(runner, tmp_path):
    out = tmp_path / "env.parquet"
    env = {"INVESTMENT_RISK_ROWS": "7", "INVESTMENT_RISK_OUT": str(out), "INVESTMENT_RISK_LOG_FORMAT": "json",
           "INVESTMENT_RISK_RUN_ID": "run-from-env"}
    result = runner.invoke(main, ["data", "synth"], env=env)
    assert result.exit_code == 0, result.output
    assert pq.read_table(out).num_rows == 7
    assert json_events(result.output)[-1]["run_id"] == "run-from-env"


@pytest.mark.parametrize("rows", ["0", "-3", "many"])
def test_bad_rows_is_a_usage_error(runner, tmp_path, rows):
    result = runner.invoke(main, ["data", "synth", "--rows", rows, "--out", str(tmp_path / "x.parquet")])
    assert result.exit_code == 2 and "--rows" in result.output


def test_bad_data_is_one_line_exit_2(runner, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "title": "t", "content": "c"}\n{oops\n')
    result = runner.invoke(main, ["data", "split", "--input", str(bad), "--out", str(tmp_path / "d")])
    assert result.exit_code == 2
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert error_lines == [f"Error: {bad} line 2: invalid JSON (Expecting property name enclosed in double quotes at column 2)"]


def test_bad_split_fraction_exit_2(runner, synth_parquet, tmp_path):
    result = runner.invoke(main, ["data", "split", "--input", str(synth_parquet), "--out", str(tmp_path / "d"),
                                  "--val", "0.6", "--test", "0.5"])
    assert result.exit_code == 2 and "--val + --test" in result.output


@pytest.fixture
def failing_command():
    """A throwaway subcommand that raises what it is given, to test the one place errors are mapped."""
    def add(exc: BaseException):
        @main.command("explode")
        def explode() -> None:
            raise exc
    yield add
    main.commands.pop("explode", None)


@pytest.mark.parametrize("exc, code", [
    (InputError("x.parquet row 3: bad"), 2), (RetryableError("device lost"), 1), (KeyboardInterrupt(), 130),
    (OSError(28, "No space left on device"), 1), (FileNotFoundError(2, "No such file or directory", "f.txt"), 2),
    (FileExistsError(17, "File exists", "/etc/hostname/x.json"), 2), (PermissionError(13, "Permission denied", "o"), 2),
])
def test_exceptions_map_to_exit_codes(runner, failing_command, exc, code):
    failing_command(exc)
    result = runner.invoke(main, ["explode"])
    assert result.exit_code == code
    if code != 130:
        assert sum(line.startswith("Error:") for line in result.output.splitlines()) == 1


def test_unexpected_errors_are_not_swallowed(runner, failing_command):
    failing_command(ZeroDivisionError("bug"))
    result = runner.invoke(main, ["explode"])
    assert result.exit_code == 1 and isinstance(result.exception, ZeroDivisionError)


def test_every_option_has_an_env_var():
    def walk(command: click.Command):
        yield command
        for sub in getattr(command, "commands", {}).values():
            yield from walk(sub)
    for command in walk(main):
        for param in command.params:
            if isinstance(param, click.Option) and param.name not in ("help", "version"):
                flag = max((opt for opt in param.opts if opt.startswith("--")), key=len)
                names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar)
                assert names[0] == "INVESTMENT_RISK_" + flag[2:].replace("-", "_").upper(), (command.name, flag)


@pytest.mark.parametrize("args", [["data", "synth", "--rows", "5"], ["data", "split", "--input", "x.parquet"],
                                  ["demo"]])
def test_a_url_where_a_path_goes_is_refused_not_written_under_a_folder_named_after_it(runner, tmp_path, monkeypatch,
                                                                                      args):
    # `--out s3://bucket/x` wrote ./s3:/bucket/x without a word (or ended in pyarrow's traceback, in score).
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(main, [*args, "--out", "s3://bucket/x"])
    assert result.exit_code == 2 and "s3://bucket/x: a URL; this takes a local or mounted path" in result.output
    assert not (tmp_path / "s3:").exists()
    monkeypatch.setenv("INVESTMENT_RISK_OUT", "gs://bucket/y")  # from the environment too
    result = runner.invoke(main, args)
    assert result.exit_code == 2 and "gs://bucket/y: a URL" in result.output, result.output


def test_an_error_before_a_command_binds_its_stage_still_has_one(runner, tmp_path):
    result = runner.invoke(main, ["score", "--model", str(tmp_path), "--input", str(tmp_path), "--out",
                                  str(tmp_path / "o"), "--shard-index", "3", "--shard-count", "2"])
    [event] = [e for e in map(json.loads, result.stdout.splitlines()) if e["event"] == "command_failed"]
    assert result.exit_code == 2 and event["stage"] == "score" and event["shard"] == 3, result.output


def test_console_script_logs_json_when_piped(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "investment-risk"
    out = tmp_path / "x.parquet"
    done = subprocess.run([str(exe), "data", "synth", "--rows", "50", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    events = json_events(done.stdout)
    assert events and all({"timestamp", "level", "event", "run_id"} <= set(e) for e in events)
    bad = subprocess.run([str(exe), "data", "split", "--input", str(tmp_path / "nope.parquet"), "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [f"Error: {tmp_path / 'nope.parquet'}: no such file or directory"]
