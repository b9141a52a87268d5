import json
import threading

import pytest
from structlog.testing import capture_logs

from investment_risk.core import logs
from investment_risk.core.logs import Progress, bind, configure_logging, get_logger, redact_secrets


def test_json_lines_with_iso_utc_timestamp_and_bound_context(capsys):
    configure_logging("json", "INFO")
    bind(run_id="r1", stage="score", shard=3)
    get_logger().info("hello", rows=5)
    get_logger().debug("hidden")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["event"] == "hello" and event["level"] == "info" and event["rows"] == 5
    assert event["run_id"] == "r1" and event["stage"] == "score" and event["shard"] == 3
    assert event["timestamp"].endswith("Z") and "T" in event["timestamp"]


def test_auto_is_json_when_not_a_terminal(capsys):
    configure_logging("auto", "DEBUG")
    get_logger().debug("dbg")
    assert json.loads(capsys.readouterr().out)["event"] == "dbg"


def test_console_format_is_not_json(capsys):
    configure_logging("console", "INFO")
    get_logger().info("readable", x=1)
    out = capsys.readouterr().out
    assert "readable" in out and not out.lstrip().startswith("{")


def test_unknown_level():
    with pytest.raises(ValueError):
        configure_logging("json", "LOUD")


@pytest.mark.parametrize("key, value", [
    ("hf_token", "abc"), ("password", "hunter2"), ("client_secret", "s"), ("api_key", "k"), ("Authorization", "x"),
])
def test_secret_keys_are_redacted(key, value):
    out = redact_secrets(None, "info", {"event": "e", key: value})
    assert out[key] == logs.REDACTED


@pytest.mark.parametrize("value", [
    "hf_abcdefghijklmnopqrstuvwxyz123456", "Bearer abcdefghijklmnop", "ghp_abcdefghijklmnopqrstuvwxyz",
    "https://host/path?token=s3cr3tvalue&x=1", "eyJhbGciOiJSUzI1NiIs.eyJpc3MiOiJrdWJlcm5ldGVz.c2lnbmF0dXJlc2ln",
    "http://alice:s3cr3tvalue@pushgateway:9091/",  # a URL's user:password (score --pushgateway)
    "http://:s3cr3tvalue@pushgateway:9091/",  # no user name
    "http://alice:p@s3cr3tvalue@pushgateway:9091/",  # an "@" inside the password: it was half left
    "no local directory 'https:/alice:s3cr3tvalue@hub.example/m'",  # a URL that pathlib made a path of
    "postgres://alice@corp.com:s3cr3tvalue@db:5432/x",  # an e-mail address as the user
    "postgresql://app:s3cr3tvalue#x@db:5432/risk", "https://user:s3cr3tvalue?x@host/x",  # a "#" or "?" inside
    "s3:/user:s3cr3tvalue@bucket/key",  # pathlib's s3:// (a digit before ":/")
    "key sk-proj-s3cr3tvalue12345678", "AKIAABCDEFGHIJKLMNOP",
])
def test_token_shaped_values_are_redacted_anywhere(value, capsys):
    configure_logging("json", "INFO")
    get_logger().info(f"loading with {value}", nested={"list": [value]}, arg=value)
    out = capsys.readouterr().out
    assert value not in out and "s3cr3tvalue" not in out and logs.REDACTED in out


def test_ordinary_values_survive():
    event = {"event": "token_count", "tokens": 10, "tokens_per_second": 5.0, "path": "/data/x.parquet",
             # Job names and the paths made of them hold "sk-" or "hf_" inside a word, not at its start.
             "out": "/data/scored/investment-risk-nightly-29420730", "job": "investment-risk-score-1764979200",
             "run": "/models/runs/graph_hf_exportedweightsv2long",
             "token_path": "/var/run/secrets-free/path", "gateway": "http://pushgateway:9091/a:b@c",
             "api": "https://api.example.com:443?email=a@b.com", "repo": "ssh://git@github.com:22/x@y",
             "mail": "https://host:8443#to=a@b.com"}
    assert redact_secrets(None, "info", dict(event)) == event


def test_progress_emits_events_with_rate_and_eta(monkeypatch):
    with capture_logs() as captured:
        with Progress(total=10, what="rows", interval_s=0.0) as progress:
            for _ in range(10):
                progress.update(1)
    events = [e for e in captured if e["event"] in ("progress", "progress_done")]
    assert len(events) == 11 and events[-1]["event"] == "progress_done"
    assert events[-1]["done"] == 10 and events[-1]["total"] == 10
    assert {"rate", "eta_s", "elapsed_s"} <= set(events[0])


def test_a_resumed_loops_rate_counts_only_this_process(monkeypatch):
    clock = iter(range(0, 1000, 10))  # each reading of the clock is 10 s later
    monkeypatch.setattr(logs.time, "monotonic", lambda: next(clock))
    progress = Progress(total=100, what="train", unit="batches", already_done=90)
    progress.update(5)  # started at 0 s, the update reads 10 s, the snapshot 20 s
    snapshot = progress.snapshot()  # 5 batches in 20 s, whatever the 90 before them took
    assert snapshot["done"] == 95 and snapshot["rate"] == 0.25 and snapshot["eta_s"] == 20.0


def test_progress_is_quiet_between_intervals():
    with capture_logs() as captured:
        with Progress(total=1000, what="rows", interval_s=3600) as progress:
            for _ in range(1000):
                progress.update(1)
    assert [e["event"] for e in captured] == ["progress_done"]


def test_a_slow_unit_still_gets_a_progress_event_every_interval(capsys):
    # One unit of work longer than the interval (a 1.5B batch on a CPU): the heartbeat speaks for it, in the
    # context the loop was bound to.
    import time

    configure_logging("json", "INFO")
    bind(run_id="r2", stage="score", shard=1)
    with Progress(total=2, what="rows", interval_s=0.2) as progress:
        time.sleep(0.7)
        progress.update(1)
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    beats = [e for e in events if e["event"] == "progress"]
    assert len(beats) >= 2 and beats[0]["done"] == 0 and beats[0]["total"] == 2
    assert all(e["stage"] == "score" and e["shard"] == 1 and e["run_id"] == "r2" for e in beats)
    assert events[-1]["event"] == "progress_done" and events[-1]["done"] == 1


def test_named_steps_are_counted_named_while_running_and_timed_at_the_end(monkeypatch):
    clock = iter(range(0, 1000, 10))  # each reading of the clock is 10 s later
    monkeypatch.setattr(logs.time, "monotonic", lambda: next(clock))
    with capture_logs() as captured:
        with Progress(None, "export", unit="steps") as progress:
            progress.step("graph")
            assert progress.snapshot()["current"] == "graph" and progress.done == 0
            progress.step("parity")
    done = captured[-1]
    assert done["event"] == "progress_done" and done["done"] == 2 and done["current"] == "parity"
    assert list(done["step_seconds"]) == ["graph", "parity"] and all(s > 0 for s in done["step_seconds"].values())
    # A step that fails keeps its seconds but is not counted as done.
    with capture_logs() as captured, pytest.raises(RuntimeError):
        with Progress(None, "export", unit="steps") as progress:
            progress.step("graph")
            raise RuntimeError("out of memory")
    assert captured[-1]["done"] == 0 and "graph" in captured[-1]["step_seconds"]
    assert captured[-1]["event"] == "progress_stopped"  # not "done": it was interrupted (SIGINT gave done: 0/10000)


@pytest.mark.parametrize("text, secret", [
    ("Traceback: HF_TOKEN=abc123def python", "abc123def"),
    ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI", "wJalrXUtnFEMI"),
    ("SECRET_KEY=s3cr3t-value", "s3cr3t-value"),
    ("DB_PASSPHRASE=hunter2", "hunter2"),
    ("run --password hunter2 --verbose", "hunter2"),
    ('password = "correct horse battery"', "horse battery"),
    ('{"hf_token": "plain-secret"}', "plain-secret"),
    ("password='abc\\' and more", "abc"),  # a shell's quoted value ending in a backslash
    ('token="abc\\" next', "abc"),
])
def test_free_text_loses_the_values_of_secret_named_keys(text, secret):
    assert secret not in logs.redact_text(text) and logs.REDACTED in logs.redact_text(text)


def test_a_redacted_json_line_is_still_json():
    # `jobs logs --raw` on a terminal prints pods' lines through redact_text: "api_key":*** would not parse
    line = json.dumps({"event": "x", "api_key": "sk-" + "a" * 30, "hf_token": "plain-secret", "n": 1,
                       "password": 'ab"cd'})  # an escaped quote inside: none of it leaks, the line still parses
    assert json.loads(logs.redact_text(line)) == {"event": "x", "api_key": "***", "hf_token": "***", "n": 1,
                                                  "password": "***"}


@pytest.mark.parametrize("text", [
    "tokens_per_second=12 token_count=5 num_tokens: 7 tokenizer: qwen",
    "Error: /var/run/secrets/huggingface/token: Permission denied",  # a file named token, not a key
    "HF_TOKEN_PATH=/var/run/secrets/huggingface/token",
    "secret_name: db --hf-token-file /x",
])
def test_free_text_keeps_counts_paths_and_names(text):
    assert logs.redact_text(text) == text


def test_a_non_finite_value_still_makes_a_json_line(capsys):
    configure_logging("json", "INFO")
    get_logger().info("epoch_done", val_mae=float("nan"), history=[{"loss": float("inf")}])
    event = json.loads(capsys.readouterr().out)  # a bare NaN would not parse
    assert event["val_mae"] == "nan" and event["history"] == [{"loss": "inf"}]


def test_library_prints_are_set_aside_while_our_lines_stay_on_stdout(capsys):
    """export redirected stdout around the ONNX exporter: the heartbeat's progress events, logged meanwhile from
    its own thread, went to stderr with the exporter's prints."""
    configure_logging("json", "INFO")
    with logs.library_prints_aside():
        print("exporter step 1/4")
        beat = threading.Thread(target=lambda: get_logger().info("progress", what="export"))
        beat.start()
        beat.join()
    get_logger().info("after")
    captured = capsys.readouterr()
    assert [json.loads(line)["event"] for line in captured.out.splitlines()] == ["progress", "after"]
    assert "exporter step" not in captured.out + captured.err  # stderr is no terminal here: nowhere
    with logs.library_prints_aside(keep=True):  # an exporter's steps and failures stay in the pod's log
        print("exporter failed at node 7")
    assert capsys.readouterr().err == "exporter failed at node 7\n"
