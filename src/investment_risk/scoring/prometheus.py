"""Scoring metrics for Prometheus, the way batch Jobs report: pushed to a Pushgateway when a shard or a merge
finishes, and written as a text file beside the output (prometheus_client's registry, push and textfile writer).

A push that fails is logged and retried a few times, and never fails the shard: the Parquet output is the product,
the metrics are its shadow. A complete batch removes the shard groups a night with more shards left behind.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from ..core.atomic import write_text_atomic
from ..core.logs import get_logger
from ..core.spec import default_spec

PUSH_JOB = "investment-risk-score"
# Each kind of batch has its own Pushgateway groups (`batch_group`): an ad-hoc backfill replaced the nightly's
# series, reset the stale-batch alert's clock and showed its numbers as tonight's.
DEFAULT_METRICS_GROUP = "adhoc"
METRICS_GROUP_PATTERN = r"[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?"
PUSH_ATTEMPTS = 3
PUSH_TIMEOUT_S = 5.0
OUTCOMES = ("in", "scored", "rejected", "prefiltered", "model")


def registry_for(metrics: dict[str, Any], scope: str) -> Any:
    """A registry holding one shard's metrics (scope "00003") or the merged batch's (scope "batch")."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics

    disable_created_metrics()  # a counter's `_created` series would double what is pushed, and nothing reads it
    registry = CollectorRegistry()

    def gauge(name: str, text: str, value: Any, **labels: str) -> None:
        if value is None:
            return
        metric = Gauge(name, text, list(labels), registry=registry) if name not in gauges else gauges[name]
        gauges[name] = metric
        (metric.labels(**labels) if labels else metric).set(float(value))

    def counter(name: str, text: str, value: Any, **labels: str) -> None:
        metric = Counter(name, text, list(labels), registry=registry) if name not in counters else counters[name]
        counters[name] = metric
        (metric.labels(**labels) if labels else metric).inc(float(value or 0))

    gauges: dict[str, Any] = {}
    counters: dict[str, Any] = {}
    for outcome in OUTCOMES:
        counter("investment_risk_rows", "Rows by outcome: in (read), scored, rejected, prefiltered, model (scored "
                "by the model).", metrics.get(f"rows_{outcome}"), outcome=outcome)
    counter("investment_risk_blank_lines", "JSONL blank lines skipped (not rows).", metrics.get("blank_lines"))
    counter("investment_risk_duplicate_ids", "Rows rejected because their id was already scored.",
            metrics.get("duplicate_ids"))
    counter("investment_risk_labels_unusable", "Label values left out of the label metrics: not a number in the "
            "score range.", metrics.get("labels_unusable"))
    counters["investment_risk_reject_rows"] = Counter("investment_risk_reject_rows", "Rejected rows by reason.",
                                                      ["reason"], registry=registry)  # declared on a night without any
    for reason, count in metrics.get("reject_reasons", {}).items():
        counter("investment_risk_reject_rows", "Rejected rows by reason.", count, reason=reason)
    # Every tier the spec names, a night without REDs too: its share reads 0, not a gap the panel draws across.
    tiers = {**dict.fromkeys(default_spec().tier_names, 0), **metrics.get("tier_counts", {})}
    total = sum(tiers.values())
    for tier, count in tiers.items():
        counter("investment_risk_tier_rows", "Scored rows by tier.", count, tier=tier)
        gauge("investment_risk_tier_share", "Share of the scored rows in each tier.", count / total if total else 0,
              tier=tier)
    seconds = metrics.get("seconds") if scope != "batch" else None
    gauge("investment_risk_scoring_seconds", "Wall time of the shard.", seconds)
    rate = metrics.get("rows_per_second") if scope != "batch" else metrics.get("rows_per_second_sum")
    gauge("investment_risk_rows_per_second", "Rows read per second (a batch: summed over its shards).", rate)
    latency = metrics.get("batch_latency_ms", {})
    p95 = latency.get("p95")
    gauge("investment_risk_batch_latency_p95_seconds", "95th percentile of one model call (a batch: over all its "
          "shards' calls, interpolated in the latency histogram's buckets).", None if p95 is None else p95 / 1000)
    gauge("investment_risk_real_token_share", "Real tokens over padded tokens in the model calls.",
          metrics.get("real_token_share"))
    gauge("investment_risk_invariant_holds", "1 when rows in = rows scored + rows rejected.",
          int(bool(metrics.get("invariant_holds"))))
    gauge("investment_risk_mae", "Mean absolute error against labels present in the input.", metrics.get("mae"))
    gauge("investment_risk_red_recall", "Share of true REDs called RED (labelled input).",
          metrics.get("decisions", {}).get("red_recall"))
    if scope == "batch":
        gauge("investment_risk_batch_complete", "1 when every shard of the batch is done.", int(bool(metrics.get("complete"))))
        gauge("investment_risk_prefilter_rate", "Prefiltered rows over rows in.", metrics.get("prefilter_rate"))
        gauge("investment_risk_reject_rate", "Rejected rows over rows in.", metrics.get("reject_rate"))
        drift = metrics.get("drift", {})
        for dim, value in drift.get("psi", {}).items():
            gauge("investment_risk_score_psi", "Population stability index of the batch's scores against the model's "
                  "reference.", value, dimension=dim)
            gauge("investment_risk_score_psi_noise", "The PSI that sampling alone gives at the batch's size (drift_detected needs more).",
                  drift.get("psi_noise", {}).get(dim), dimension=dim)
            gauge("investment_risk_score_drifted", "1 when the dimension's PSI is over the threshold and the noise.",
                  int(dim in drift.get("drifted_dimensions", [])), dimension=dim)
    if scope != "batch" or metrics.get("complete"):  # a night half done has not succeeded: its age keeps growing
        # when it finished (a batch: its last shard), not when it was merged: merging an old batch again is no
        # success of tonight's
        finished = metrics.get("finished_at")
        gauge("investment_risk_last_success_timestamp_seconds", "When the shard, or the whole batch, finished.",
              dt.datetime.fromisoformat(finished).timestamp() if finished else time.time())
    return registry


def write_textfile(metrics: dict[str, Any], scope: str, dest: Path) -> None:
    """The Prometheus text beside the output, through the package's one atomic writer (fsynced; a hidden temporary
    name that a failure removes), for the node exporter's textfile collector."""
    from prometheus_client import generate_latest

    write_text_atomic(generate_latest(registry_for(metrics, scope)).decode(), dest)


def _gateway(gateway: str) -> tuple[str, list[tuple[str, str]]]:
    """The Pushgateway URL without a `user:password@`, and the HTTP basic-auth header they stand for: urllib would
    read them as part of the host name, so a gateway behind basic auth was never reached."""
    parts = urllib.parse.urlsplit(gateway if "://" in gateway else f"http://{gateway}")
    if parts.username is None:
        return gateway, []
    credentials = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
    bare = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return bare, [("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())]


def _handler(auth: list[tuple[str, str]]) -> Any:
    """prometheus_client's request handler, with the basic-auth header added."""
    from prometheus_client.exposition import default_handler

    return lambda url, method, timeout, headers, data: default_handler(url, method, timeout, [*headers, *auth], data)


def push(metrics: dict[str, Any], scope: str, gateway: str | None) -> bool:
    """Push to the Pushgateway, grouped by job, batch group and shard; retried, logged, never raised. True when it
    got there."""
    if not gateway:
        return False
    from prometheus_client import push_to_gateway, pushadd_to_gateway

    gateway, auth = _gateway(gateway)
    log = get_logger()
    registry = registry_for(metrics, scope)
    grouping = {"batch_group": metrics.get("metrics_group", DEFAULT_METRICS_GROUP), "shard": scope}
    # A partial batch replaces only what it measured: the last whole batch's success time (and PSI) stay in the group.
    send = pushadd_to_gateway if scope == "batch" and not metrics.get("complete") else push_to_gateway
    for attempt in range(1, PUSH_ATTEMPTS + 1):
        try:
            send(gateway, job=PUSH_JOB, registry=registry, grouping_key=grouping, timeout=PUSH_TIMEOUT_S,
                 handler=_handler(auth))
            log.info("metrics_pushed", gateway=gateway, group=scope, attempt=attempt)
            return True
        except Exception as exc:  # noqa: BLE001 - any failure to push is logged, never fatal
            log.warning("metrics_push_failed", gateway=gateway, group=scope, attempt=attempt,
                        error=f"{exc.__class__.__name__}: {exc}"[:300])
            if attempt < PUSH_ATTEMPTS:
                time.sleep(0.5 * 2 ** (attempt - 1))
    return False


def remove_stale_shard_groups(group: str, shard_count: int, started: float, gateway: str | None) -> list[str]:
    """Delete the batch group's shard groups numbered `shard_count` and above and last pushed before the batch
    began (`started`, a Unix time): an earlier night scored with more shards pushed them, no shard of this
    count replaces them, and a query over the shards would count their rows again. Groups pushed since are
    another batch's under way (a re-merged old night must not remove tonight's). Logged, never raised; returns
    the shards removed."""
    if not gateway:
        return []
    from prometheus_client import delete_from_gateway

    gateway, auth = _gateway(gateway)
    log = get_logger()
    url = gateway if "://" in gateway else f"http://{gateway}"  # as prometheus_client reads it
    try:
        request = urllib.request.Request(f"{url.rstrip('/')}/api/v1/metrics", headers=dict(auth))
        with urllib.request.urlopen(request, timeout=PUSH_TIMEOUT_S) as response:
            groups = json.load(response).get("data", [])
        stale = sorted(labels["shard"] for g in groups if (labels := g.get("labels", {})).get("job") == PUSH_JOB
                       and labels.get("batch_group") == group and labels.get("shard", "").isdigit()
                       and int(labels["shard"]) >= shard_count and _pushed_at(g) < started)
        for shard in stale:
            delete_from_gateway(gateway, job=PUSH_JOB, grouping_key={"batch_group": group, "shard": shard},
                                timeout=PUSH_TIMEOUT_S, handler=_handler(auth))
    except Exception as exc:  # noqa: BLE001 - like a push: logged, never fatal
        log.warning("metrics_stale_groups_not_removed", gateway=gateway, batch_group=group,
                    error=f"{exc.__class__.__name__}: {exc}"[:300])
        return []
    if stale:
        log.info("metrics_stale_groups_removed", gateway=gateway, batch_group=group, shards=stale)
    return stale


def _pushed_at(group: dict[str, Any]) -> float:
    """When the Pushgateway last changed the group (its own push_time_seconds); unknown counts as now: kept."""
    try:
        return float(group["push_time_seconds"]["metrics"][0]["value"])
    except (KeyError, IndexError, TypeError, ValueError):
        return time.time()
