"""Scoring metrics reach Prometheus through a real Pushgateway (Debian's prometheus-pushgateway on a loopback
port), and a Pushgateway that is down never fails a shard."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from investment_risk.cli import main
from investment_risk.scoring import prometheus, shard_metrics
from investment_risk.scoring.pipeline import ScoreConfig, score
from investment_risk.scoring.shard_metrics import MERGE_LOCK, merge_metrics, merge_until_complete

PUSHGATEWAY = shutil.which("prometheus-pushgateway") or "/usr/bin/prometheus-pushgateway"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pushgateway():
    if not shutil.which(PUSHGATEWAY):
        pytest.fail("prometheus-pushgateway is not installed: `make test` installs Debian's package (as root)")
    port = free_port()
    # Debian's build keeps its groups in /var/lib/prometheus by default: an empty file name keeps them in memory,
    # so each run starts from an empty gateway and leaves the machine's alone.
    proc = subprocess.Popen([PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{port}", "--persistence.file="],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{url}/-/ready", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "instance"))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("investment_risk_")}


def test_each_shard_and_the_batch_push_their_metrics(exported, split_dir, tmp_path, pushgateway):
    _, model, _ = exported
    for shard in (0, 1):
        merged = score(ScoreConfig(model=model, inputs=(str(split_dir / "test.parquet"),), out=tmp_path / "out",
                                   shard_index=shard, shard_count=2, pushgateway=pushgateway))
    got = scrape(pushgateway)
    job = ("job", prometheus.PUSH_JOB)
    group = ("batch_group", prometheus.DEFAULT_METRICS_GROUP)
    shard_rows = sum(got[("investment_risk_rows_total", tuple(sorted([job, group, ("outcome", "in"), ("shard", s)])))]
                     for s in ("00000", "00001"))
    assert shard_rows == merged["rows_in"] > 0
    batch = tuple(sorted([job, group, ("shard", "batch")]))
    assert got[("investment_risk_batch_complete", batch)] == 1
    assert got[("investment_risk_rows_total", tuple(sorted([*batch, ("outcome", "scored")])))] == merged["rows_scored"]
    psi = {dict(labels)["dimension"]: value for (name, labels), value in got.items() if name == "investment_risk_score_psi"}
    assert psi.keys() == merged["drift"]["psi"].keys()
    tiers = {dict(labels)["tier"]: value for (name, labels), value in got.items()
             if name == "investment_risk_tier_share" and dict(labels)["shard"] == "batch"}
    assert {tier for tier, share in tiers.items() if share > 0} == set(merged["tier_counts"])
    # The next night, half done: it is not a success, and the dashboard's "hours since the last batch" keeps counting
    # from the last whole one.
    finished = got[("investment_risk_last_success_timestamp_seconds", batch)]
    # ... which is when its last shard finished, not when it was merged: merged again later, it is no new success
    assert finished == dt.datetime.fromisoformat(merged["finished_at"]).timestamp()
    time.sleep(1.1)
    with capture_logs() as logs:
        merge_until_complete(tmp_path / "out", 2, gateway=pushgateway)
    assert [e["group"] for e in logs if e["event"] == "metrics_pushed"] == ["batch"]  # merged and pushed once
    assert scrape(pushgateway)[("investment_risk_last_success_timestamp_seconds", batch)] == finished
    score(ScoreConfig(model=model, inputs=(str(split_dir / "test.parquet"),), out=tmp_path / "next",
                      shard_index=0, shard_count=2, pushgateway=pushgateway))
    got = scrape(pushgateway)
    assert got[("investment_risk_batch_complete", batch)] == 0
    assert got[("investment_risk_last_success_timestamp_seconds", batch)] == finished
    partial = generate_latest(prometheus.registry_for({"complete": False}, "batch")).decode()
    assert "investment_risk_last_success" not in partial and "investment_risk_batch_complete 0" in partial
    assert "_created" not in (tmp_path / "out" / "metrics.prom").read_text()  # no second series per counter


def test_the_nightly_and_an_adhoc_batch_push_to_groups_of_their_own(exported, split_dir, tmp_path, pushgateway,
                                                                     runner):
    # An ad-hoc backfill pushed to the nightly's groups: it reset the stale-batch alert's clock, and its partial
    # merges set the nightly's batch_complete to 0 and showed its rows as tonight's.
    _, model, _ = exported
    inputs = (str(split_dir / "test.parquet"),)
    nightly = score(ScoreConfig(model=model, inputs=inputs, out=tmp_path / "night", metrics_group="nightly",
                                pushgateway=pushgateway))
    score(ScoreConfig(model=model, inputs=inputs, out=tmp_path / "backfill", shard_count=2, pushgateway=pushgateway))
    got = scrape(pushgateway)

    def batch(group):
        return tuple(sorted([("job", prometheus.PUSH_JOB), ("batch_group", group), ("shard", "batch")]))

    assert got[("investment_risk_batch_complete", batch("nightly"))] == 1
    assert got[("investment_risk_batch_complete", batch("adhoc"))] == 0
    assert got[("investment_risk_rows_total", tuple(sorted([*batch("nightly"), ("outcome", "in")])))] == nightly["rows_in"]
    assert nightly["metrics_group"] == "nightly"
    for bad in ("Nightly", "night ly", "-x", ""):
        result = runner.invoke(main, ["score", "--model", str(model), "--input", inputs[0], "--out",
                                      str(tmp_path / "bad"), "--metrics-group", bad])
        assert result.exit_code == 2 and "--metrics-group" in result.output, (bad, result.output)


def test_a_complete_batch_removes_the_shard_groups_a_bigger_night_left(exported, split_dir, tmp_path, pushgateway):
    # A night of 3 shards, then one of 2: shard 00002's group kept last night's rows, which a sum over the shards
    # counted again. Other batch groups and jobs are not touched, nor a group pushed since the batch began (another
    # batch's under way), and a batch half done removes nothing.
    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

    _, model, _ = exported
    inputs = (str(split_dir / "test.parquet"),)

    def night(out, shards, only=None):
        for shard in range(shards) if only is None else (only,):
            score(ScoreConfig(model=model, inputs=inputs, out=out, shard_index=shard, shard_count=shards,
                              metrics_group="shrinking", pushgateway=pushgateway))

    def shard_groups(group):
        return {dict(labels).get("shard") for (_, labels), _ in scrape(pushgateway).items()
                if ("batch_group", group) in labels and ("job", prometheus.PUSH_JOB) in labels}

    registry = CollectorRegistry()
    Gauge("investment_risk_other", "another group's series", registry=registry).set(1)
    for job, group in ((prometheus.PUSH_JOB, "other"), ("another-job", "shrinking")):
        push_to_gateway(pushgateway, job=job, registry=registry, grouping_key={"batch_group": group, "shard": "00002"})
    night(tmp_path / "first", 3)
    assert shard_groups("shrinking") == {"00000", "00001", "00002", "batch"}
    time.sleep(1.1)  # shards record their start to the second
    night(tmp_path / "second", 2, only=0)
    assert shard_groups("shrinking") == {"00000", "00001", "00002", "batch"}  # not complete: nothing removed
    push_to_gateway(pushgateway, job=prometheus.PUSH_JOB, registry=registry,
                    grouping_key={"batch_group": "shrinking", "shard": "00007"})
    with capture_logs() as logs:
        night(tmp_path / "second", 2, only=1)
    assert shard_groups("shrinking") == {"00000", "00001", "00007", "batch"}
    assert shard_groups("other") == {"00002"}
    assert any(("job", "another-job") in labels for (_, labels), _ in scrape(pushgateway).items())
    assert [e["shards"] for e in logs if e["event"] == "metrics_stale_groups_removed"] == [["00002"]]


def test_a_batch_of_mixed_groups_removes_nothing(exported, split_dir, tmp_path, pushgateway):
    # Its shards pushed to two groups and its merge to neither: "mixed" is no group of its, even one a user named so.
    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

    _, model, _ = exported
    registry = CollectorRegistry()
    Gauge("investment_risk_other", "another group's series", registry=registry).set(1)
    push_to_gateway(pushgateway, job=prometheus.PUSH_JOB, registry=registry,
                    grouping_key={"batch_group": "mixed", "shard": "00005"})
    time.sleep(1.1)  # shards record their start to the second
    for shard, group in enumerate(("left", "right")):
        merged = score(ScoreConfig(model=model, inputs=(str(split_dir / "test.parquet"),), out=tmp_path / "out",
                                   shard_index=shard, shard_count=2, metrics_group=group, pushgateway=pushgateway))
    assert merged["complete"] and merged["metrics_group"] == "mixed"
    assert any(("batch_group", "mixed") in labels and ("shard", "00005") in labels
               for (_, labels), _ in scrape(pushgateway).items())


def test_merges_take_turns_so_a_partial_push_cannot_land_after_the_whole_one(exported, split_dir, tmp_path, monkeypatch):
    # Every finishing shard merges and pushes: a partial merge whose push was slow (retried) landed after the
    # complete merge's and left the gateway saying the finished night was incomplete. A merge waits for the one
    # under way (OUT/.merge.lock) and pushes inside its turn.
    import threading

    from investment_risk.core.atomic import hold_lock

    _, model, _ = exported
    out = tmp_path / "out"
    score(ScoreConfig(model=model, inputs=(str(split_dir / "test.parquet"),), out=out))
    held = hold_lock(out / MERGE_LOCK)  # a merge under way
    merged = []
    waiting = threading.Thread(target=lambda: merged.append(merge_metrics(out)))
    waiting.start()
    waiting.join(timeout=1.0)
    assert waiting.is_alive() and merged == []
    os.close(held)
    waiting.join(timeout=30)
    assert merged and merged[0]["complete"]
    # A merge that waited its time in vain (a holder stuck) pushes only a complete batch: its partial push could
    # land after the complete one
    partial = tmp_path / "partial"
    score(ScoreConfig(model=model, inputs=(str(split_dir / "test.parquet"),), out=partial, shard_count=2))
    held = hold_lock(partial / MERGE_LOCK)
    monkeypatch.setattr(shard_metrics, "MERGE_TURN_WAIT_S", 0.2)
    try:
        with capture_logs() as logs:
            merge_metrics(partial, gateway=f"http://127.0.0.1:{free_port()}")
    finally:
        os.close(held)
    events = [e["event"] for e in logs]
    assert "turn_not_awaited" in events and not [e for e in events if e.startswith("metrics_push")], events


def test_a_pushgateway_that_is_down_is_logged_and_scoring_succeeds(exported, split_dir, tmp_path, runner):
    _, model, _ = exported
    dead = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(main, ["score", "--model", str(model), "--input", str(split_dir / "test.parquet"),
                                  "--out", str(tmp_path / "cli"), "--pushgateway", dead])
    assert result.exit_code == 0 and "metrics_push_failed" in result.output, result.output
    with capture_logs() as logs:
        score(ScoreConfig(model=model, inputs=(str(split_dir / "test.parquet"),), out=tmp_path / "out", pushgateway=dead))
    failures = [e for e in logs if e["event"] == "metrics_push_failed"]
    assert len(failures) == 2 * prometheus.PUSH_ATTEMPTS  # the shard's and the batch's, each retried
    assert (tmp_path / "out" / "_done" / "part-00000").exists()


def test_a_pushgateway_behind_basic_auth_gets_the_urls_credentials(exported, split_dir, tmp_path):
    """urllib read `user:password@` as part of the host name: a gateway behind basic auth was never reached."""
    import base64
    import http.server
    import threading

    seen = []

    class Gateway(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            seen.append((self.command, self.path, self.headers.get("Authorization")))
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = b'{"status": "success", "data": []}' if self.command == "GET" else b""
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_DELETE = answer

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _, model, _ = exported
    gateway = f"http://ops:p%40ss@127.0.0.1:{server.server_address[1]}"
    with capture_logs() as logs:
        score(ScoreConfig(model=model, inputs=(str(split_dir / "test.parquet"),), out=tmp_path / "out",
                          pushgateway=gateway))
    server.shutdown()
    assert [e["event"] for e in logs].count("metrics_pushed") == 2, [e for e in logs if "metrics" in e["event"]]
    expected = "Basic " + base64.b64encode(b"ops:p@ss").decode()
    assert {method for method, _, _ in seen} >= {"PUT", "GET"} and all(auth == expected for _, _, auth in seen), seen
    assert not any("p%40ss" in str(e) or "p@ss" in str(e) for e in logs)  # the password is in no log line


def test_the_textfile_beside_the_output_is_valid_exposition(exported, split_dir, tmp_path):
    _, model, _ = exported
    merged = score(ScoreConfig(model=model, inputs=(str(split_dir / "test.parquet"),), out=tmp_path / "out"))
    families = {f.name: f for f in text_string_to_metric_families((tmp_path / "out" / "metrics.prom").read_text())}
    assert families["investment_risk_rows"].type == "counter" and families["investment_risk_rows"].documentation
    assert {s.labels["dimension"] for s in families["investment_risk_score_psi"].samples} == set(merged["drift"]["psi"])
    drifted = {s.labels["dimension"]: s.value for s in families["investment_risk_score_drifted"].samples}
    assert drifted == {d: float(d in merged["drift"]["drifted_dimensions"]) for d in merged["drift"]["psi"]}


def test_a_batchs_latency_percentiles_pool_every_shards_calls(exported, articles, tmp_path):
    """One small shard with one slow call is the worst shard's p95, not the batch's, nor the gauge's."""
    import json

    from investment_risk.scoring.shard_metrics import LATENCY_EDGES_MS, histogram_quantile, merge_metrics

    _, model, _ = exported
    out = tmp_path / "out"
    for shard in (0, 1):
        score(ScoreConfig(model=model, inputs=(str(articles),), out=out, shard_index=shard, shard_count=2))
    calls = {0: [0] * (len(LATENCY_EDGES_MS) + 1), 1: [0] * (len(LATENCY_EDGES_MS) + 1)}
    calls[0][LATENCY_EDGES_MS.index(10) + 1] = 1000  # 1,000 calls in [10, 20) ms
    calls[1][LATENCY_EDGES_MS.index(5000) + 1] = 1  # 1 call in [5000, 10000) ms
    for shard, p95 in ((0, 19.0), (1, 5000.0)):
        path = out / "metrics" / f"part-{shard:05d}.json"
        metrics = json.loads(path.read_text())
        metrics["batch_latency_ms"].update(p50=p95, p95=p95, histogram=calls[shard])
        path.write_text(json.dumps(metrics))
    latency = merge_metrics(out)["batch_latency_ms"]
    assert 10 <= latency["p95"] < 20 and 10 <= latency["p50"] < latency["p95"]
    assert latency["p95_max"] == 5000.0 == latency["p50_max"]
    families = {f.name: f for f in text_string_to_metric_families((out / "metrics.prom").read_text())}
    [gauge] = families["investment_risk_batch_latency_p95_seconds"].samples
    assert gauge.value == pytest.approx(latency["p95"] / 1000)
    assert histogram_quantile(0.95, [0] * (len(LATENCY_EDGES_MS) + 1)) is None  # no call at all: unknown, not 0
    assert histogram_quantile(0.5, [0] * len(LATENCY_EDGES_MS) + [3]) == LATENCY_EDGES_MS[-1]  # the open bucket


def test_a_pooled_percentile_stays_between_the_shards_own(exported, articles, tmp_path):
    # 1,000 calls in the 20-50 ms bucket whose exact p95 is 28 ms: the bucket's interpolation said 48.5 ms, above
    # every shard's own, which no pooled percentile can be.
    import json

    from investment_risk.scoring.shard_metrics import LATENCY_EDGES_MS, merge_metrics

    _, model, _ = exported
    out = tmp_path / "out"
    score(ScoreConfig(model=model, inputs=(str(articles / "a.parquet"),), out=out))
    path = out / "metrics" / "part-00000.json"
    metrics = json.loads(path.read_text())
    calls = [0] * (len(LATENCY_EDGES_MS) + 1)
    calls[LATENCY_EDGES_MS.index(20) + 1] = 1000
    metrics["batch_latency_ms"].update(p50=25.0, p95=28.0, histogram=calls)
    path.write_text(json.dumps(metrics))
    latency = merge_metrics(out)["batch_latency_ms"]
    assert latency["p95"] == 28.0 and latency["p50"] == 25.0


def test_every_tier_has_a_share_series_a_night_without_it_too():
    from investment_risk.core.spec import default_spec

    text = generate_latest(prometheus.registry_for({"tier_counts": {"BLUE": 3, "YELLOW": 1}}, "batch")).decode()
    shares = {s.labels["tier"]: s.value for f in text_string_to_metric_families(text)
              if f.name == "investment_risk_tier_share" for s in f.samples}
    assert set(shares) == set(default_spec().tier_names) and shares["RED"] == 0.0 and shares["BLUE"] == 0.75
