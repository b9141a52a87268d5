"""Calibration, head+tail truncation, decision metrics, dimension redundancy and the scored files' provenance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from structlog.testing import capture_logs

from investment_risk.cli import main
from investment_risk.core.decisions import decision_metrics, ranking_quality, tier_report
from investment_risk.core.errors import InputError
from investment_risk.core.spec import DIMENSIONS, default_spec
from investment_risk.datasets.synth import SynthConfig, generate
from investment_risk.modeling.calibration import (CALIBRATION_FILE, MIN_ROWS, fit_calibration, load_calibration,
                                                  parse_calibration)
from investment_risk.modeling.description import describe_model

from .conftest import assert_json_stdout


def shrunk(labels: np.ndarray) -> np.ndarray:
    """What an MSE regressor does: predictions pulled towards the middle."""
    return 5.0 + 0.35 * (labels - 5.0)


# --- the map itself --------------------------------------------------------------------------------------------

def test_isotonic_calibration_stretches_shrunk_scores_back_and_stays_monotone(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.uniform(0, 10, size=(400, 8)).astype(np.float32)
    raw = shrunk(labels) + rng.normal(0, 0.2, size=labels.shape)
    calibration = fit_calibration(raw, labels, {"split": "test"})
    calibrated = calibration.apply(raw)
    assert np.abs(calibrated - labels).mean() < 0.5 * np.abs(raw - labels).mean()
    grid = np.repeat(np.linspace(0, 10, 101)[:, None], 8, axis=1)
    mapped = calibration.apply(grid)
    assert (np.diff(mapped, axis=0) >= 0).all() and mapped.min() >= 0 and mapped.max() <= 10
    # The JSON round-trips through the validator unchanged.
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps(calibration.to_json()))
    assert np.array_equal(load_calibration(tmp_path).apply(raw), calibrated)


def test_calibration_error_sees_shrunk_scores_that_bias_and_mae_miss():
    # A regressor shrunk towards the mean is unbiased on average while its 8s are the oracle's 10s: the binned
    # calibration error says so (about a quarter of the spread), and falls to near 0 once the map is applied.
    from investment_risk.core.metrics import calibration_metrics

    rng = np.random.default_rng(1)
    labels = rng.uniform(0, 10, size=(2000, 8))
    raw = 5 + 0.5 * (labels - 5)
    before = calibration_metrics(raw, labels)
    assert all(abs(m["bias"]) < 0.15 for m in before["per_dimension"].values())
    assert 1.0 < before["calibration_error"] < 1.5
    # the reliability diagram's points: bins of one point of the scale, every row in one, the mean label beyond
    # the mean score above the middle (shrunk) and below it under the middle
    points = before["reliability"][DIMENSIONS[0]]
    assert sum(p["rows"] for p in points) == len(labels) and all(p["high"] - p["low"] == 1 for p in points)
    assert all((p["mean_label"] > p["mean_score"]) == (p["mean_score"] > 5) for p in points)
    after = calibration_metrics(fit_calibration(raw, labels, {"split": "test"}).apply(raw), labels)
    assert after["calibration_error"] < 0.1 * before["calibration_error"]
    assert calibration_metrics(labels, labels)["calibration_error"] == 0
    # a score of exactly 10 falls in the last bin, as in the score histograms
    top = calibration_metrics(np.full((3, 8), 10.0), np.full((3, 8), 9.0))["reliability"][DIMENSIONS[0]]
    assert top == [{"low": 9.0, "high": 10.0, "rows": 3, "mean_score": 10.0, "mean_label": 9.0}]


def test_a_calibration_fitted_on_float32_neighbours_and_a_near_zero_score_loads_back(tmp_path):
    """Model outputs are float32: 5.0 and the next float32 up, or 3e-7 beside the 0 the fit prepends, must stay
    distinct breakpoints, or the file fails its own strictly-increasing check and the model cannot be used."""
    rng = np.random.default_rng(1)
    labels = rng.uniform(0, 10, size=(200, 8))
    raw = shrunk(labels).astype(np.float32)
    raw[:20] = np.float32(5.0)
    raw[20:40] = np.nextafter(np.float32(5.0), np.float32(10.0))
    labels[20:40] = 9.5  # so the fit keeps both neighbours as breakpoints
    raw[40, :], labels[40, :] = np.float32(3e-7), 0.0
    calibration = fit_calibration(raw, labels, {"split": "val"})
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps(calibration.to_json()))
    assert np.array_equal(load_calibration(tmp_path).apply(raw), calibration.apply(raw))


@pytest.mark.parametrize("break_it, why", [
    (lambda d: d["dimensions"]["valuation_risk"]["y"].reverse(), "not monotone"),
    (lambda d: d["dimensions"]["systemic_risk"]["x"].__setitem__(1, float("nan")), "NaN"),
    (lambda d: d["dimensions"]["actionability"]["x"].__setitem__(-1, 9.0), "not the score range"),
    (lambda d: d["dimensions"].pop("credit_market_stress"), "exactly the dimensions"),
])
def test_a_bad_calibration_file_is_refused_naming_it(tmp_path, break_it, why):
    raw = {"dimensions": {d: {"x": [0.0, 4.0, 10.0], "y": [1.0, 3.0, 9.0]} for d in DIMENSIONS}}
    parse_calibration(raw, tmp_path / CALIBRATION_FILE)  # the unbroken one is fine
    break_it(raw)
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps(raw).replace("NaN", "NaN"))
    with pytest.raises(InputError, match=f"{CALIBRATION_FILE}.*{why}"):
        load_calibration(tmp_path)


def test_too_few_rows_cannot_be_calibrated():
    labels = np.full((MIN_ROWS - 1, 8), 5.0, dtype=np.float32)
    with pytest.raises(InputError, match=f"at least {MIN_ROWS}"):
        fit_calibration(labels, labels, {})


# --- decision metrics ------------------------------------------------------------------------------------------

def test_tier_report_counts_precision_recall_and_red_misses():
    names = ("RED", "YELLOW", "GREEN")
    # 4 true REDs: 3 called RED, 1 called YELLOW; 1 YELLOW called RED; 5 GREENs right.
    report = tier_report([[3, 1, 0], [1, 0, 0], [0, 0, 5]], names)
    red = report["per_tier"]["RED"]
    assert red["precision"] == pytest.approx(3 / 4) and red["recall"] == pytest.approx(3 / 4)
    assert report["red_recall"] == pytest.approx(0.75) and report["red_false_negative_rate"] == pytest.approx(0.25)
    assert report["per_tier"]["YELLOW"]["recall"] == 0.0 and report["per_tier"]["YELLOW"]["precision"] == 0.0
    assert report["per_tier"]["YELLOW"]["f1"] == 0.0  # called and present, never hit: 0, not unknown
    assert tier_report([[5, 0], [0, 0]], ("GREEN", "RED"))["per_tier"]["RED"]["f1"] is None  # never occurs
    never_called = tier_report([[5, 0], [3, 0]], ("GREEN", "RED"))["per_tier"]["RED"]  # a model that never says RED
    assert never_called["precision"] is None and never_called["recall"] == 0.0 == never_called["f1"]
    assert report["tier_accuracy"] == pytest.approx(8 / 10)


def test_ranking_quality_is_perfect_for_the_true_order_and_drops_for_a_reversed_one():
    truth = np.arange(20, dtype=np.float64)
    perfect = ranking_quality(truth, truth, 5)
    assert perfect["recall_at_k"] == 1.0 and perfect["ndcg_at_k"] == pytest.approx(1.0)
    reversed_ = ranking_quality(-truth, truth, 5)
    assert reversed_["recall_at_k"] == 0.0 and reversed_["ndcg_at_k"] < 0.5
    # Rows without a strength (prefiltered) are never in the model's list, even where k is longer than the rest.
    unranked = ranking_quality(np.array([-np.inf, -np.inf, 5.0, 4.0]), np.array([9.0, 8.0, 1.0, 0.5]), 3)
    assert unranked["recall_at_k"] == pytest.approx(1 / 3) and unranked["ndcg_at_k"] < 0.2


def test_ranking_quality_of_tied_strengths_does_not_depend_on_row_order():
    # A calibrated model gives many equal strengths: which tied row came first in the file decided recall (0 or 1)
    pred, truth = np.array([5.0, 5.0, 1.0]), np.array([1.0, 9.0, 0.0])
    for order in ([0, 1, 2], [1, 0, 2], [2, 1, 0]):
        quality = ranking_quality(pred[order], truth[order], 1)
        assert quality["recall_at_k"] == pytest.approx(0.5)  # its expected value over the tie's orders
        assert quality["ndcg_at_k"] == pytest.approx((1 + 9) / 2 / 9)  # sklearn's ndcg_score: 0.556


def test_decision_metrics_on_labels_themselves_are_perfect():
    labels = np.stack([c.to_numpy(zero_copy_only=False) for c in
                       generate(SynthConfig(rows=200, seed=3)).select(list(DIMENSIONS)).columns], axis=1)
    metrics = decision_metrics(labels, labels, default_spec(), k=20)
    assert metrics["tier_accuracy"] == 1.0 and metrics["ranking"]["ndcg_at_k"] == pytest.approx(1.0)
    assert all(v is None or v == pytest.approx(1.0) for v in metrics["spearman"].values())


# --- a calibrated run, end to end ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny-qwen2 run trained with head+tail truncation on a split whose val has enough rows to calibrate, and its
    export."""
    from investment_risk.datasets.split import SplitConfig, run_split
    from investment_risk.export.onnx_export import export_run
    from investment_risk.training.config import TrainConfig
    from investment_risk.training.recipe import train

    root = tmp_path_factory.mktemp("calibrated")
    pq.write_table(generate(SynthConfig(rows=320, seed=11)), root / "all.parquet")
    run_split([str(root / "all.parquet")], root / "data", SplitConfig(val=0.2, test=0.2, seed=2))
    metadata = train(TrainConfig(mode="distillation", base_model="tiny-qwen2", data=str(root / "data"),
                                 out=str(root / "run"), epochs=1, batch_size=8, learning_rate=2e-3, max_length=48,
                                 warmup_steps=2, device="cpu", truncation="head-tail"))
    info = export_run(root / "run", root / "model", cpu_engine="onnxruntime")
    return root, metadata, info


def test_training_fits_the_calibration_and_reports_it(calibrated):
    root, metadata, _ = calibrated
    assert metadata["calibration"]["fitted"] and metadata["truncation"] == "head-tail"
    # Fitted only on the articles scoring applies it to: the prefilter's noise is left out.
    fitted_on = json.loads((root / "run" / "model" / CALIBRATION_FILE).read_text())["fitted_on"]
    val = pq.read_table(root / "data" / "val.parquet")
    left_out = int(default_spec().prefiltered(val).sum())
    assert left_out >= 1 and fitted_on["rows_prefiltered_left_out"] == left_out
    assert fitted_on["rows"] == val.num_rows - left_out
    summary = (root / "run" / "training_reports" / "training_summary.txt").read_text()
    assert "Calibration" in summary and "calibrated=" in summary
    # the calibration's own figure, raw and after the map (in-sample: isotonic on its fitting rows is near 0)
    record = metadata["calibration"]
    assert record["val_calibration_error_calibrated"] < record["val_calibration_error_raw"]
    assert "Val calibration error" in summary
    reports = root / "run" / "training_reports"
    assert (reports / "dimension_correlations.png").stat().st_size > 0
    assert "Dimension redundancy" in (reports / "dimensions.md").read_text()


def test_export_carries_calibration_and_truncation_into_the_model(calibrated):
    root, _, info = calibrated
    assert info["calibrated"] and info["truncation"] == "head-tail" and CALIBRATION_FILE in info["sha256"]
    model = describe_model(root / "model")
    assert model.calibration is not None and model.truncation == "head-tail"
    long_article = " ".join(f"word{i}" for i in range(400))
    from investment_risk.modeling.presets import load_tokenizer

    tokenizer = load_tokenizer(model.tokenizer_dir)
    row = model.token_rows(tokenizer, ["T"], [long_article + " THE-END"])[0]
    assert len(row) == 48 and "END" in tokenizer.decode(row[-6:])  # the tail survived the cut


def test_score_applies_the_calibration_and_records_provenance(calibrated, runner, tmp_path):
    import duckdb

    root, _, _ = calibrated
    inputs = str(root / "data" / "test.parquet")
    outs = {}
    for name, extra in (("cal", []), ("raw", ["--no-calibration"])):
        result = runner.invoke(main, ["score", "--model", str(root / "model"), "--input", inputs,
                                      "--out", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
        outs[name] = pq.read_table(tmp_path / name / "part-00000.parquet").sort_by("id")
    raw = np.stack([outs["raw"].column(d).to_numpy() for d in DIMENSIONS], axis=1)
    cal = np.stack([outs["cal"].column(d).to_numpy() for d in DIMENSIONS], axis=1)
    expected = describe_model(root / "model").calibration.apply(raw)
    np.testing.assert_allclose(cal, expected, atol=1e-5)
    assert not np.allclose(cal, raw)
    meta = pq.read_schema(tmp_path / "cal" / "part-00000.parquet").metadata
    assert meta[b"investment_risk.calibrated"] == b"true" and meta[b"investment_risk.truncation"] == b"head-tail"
    assert meta[b"investment_risk.model_version"] == describe_model(root / "model").model_version.encode()
    assert pq.read_schema(tmp_path / "raw" / "part-00000.parquet").metadata[b"investment_risk.calibrated"] == b"false"
    rows = duckdb.sql(f"select key::varchar, value::varchar from parquet_kv_metadata('{tmp_path / 'cal'}/part-00000.parquet')"
                      ).fetchall()
    found = dict(rows)
    assert found["investment_risk.filter_name"] == default_spec().name and found["investment_risk.shard"] == "0/1"
    for key in ("package_version", "created_at", "filter_version"):
        assert found[f"investment_risk.{key}"]
    # Drift compares like with like: the calibrated reference against calibrated scores only.
    assert "psi" in json.loads((tmp_path / "cal" / "metrics.json").read_text())["drift"]
    assert "drift" not in json.loads((tmp_path / "raw" / "metrics.json").read_text())
    skipped = json.loads((tmp_path / "raw" / "metrics.json").read_text())["drift_skipped"]
    assert skipped == "the batch's scores are raw and the reference's are calibrated"
    report = runner.invoke(main, ["report", "drift", "--reference", str(root / "model"), "--current",
                                  str(tmp_path / "raw"), "--out", str(tmp_path / "drift")])
    assert report.exit_code == 2 and skipped in report.output  # the same rule as the merge's
    batch = runner.invoke(main, ["report", "batch", "--scored", str(tmp_path / "raw"), "--out", str(tmp_path / "b")])
    assert batch.exit_code == 0, batch.output
    assert f"Drift not measured: {skipped}".replace("'", "&#x27;") in (tmp_path / "b" / "batch_report.html").read_text()
    # Labelled input: the scorer's metrics carry the tier confusion and RED recall.
    merged = json.loads((tmp_path / "cal" / "metrics.json").read_text())
    assert sum(map(sum, merged["decisions"]["confusion"])) == merged["rows_scored"]  # prefiltered rows: as NOISE
    assert merged["labelled_rows"] == merged["rows_model"]  # the MAE's rows: those with scores


def test_one_batch_is_on_one_score_scale(calibrated, runner, tmp_path):
    """A shard scored with --no-calibration beside calibrated ones merged as complete: one MAE, tier metrics and
    ledger night over two scales, which its rows (one model_version) could not tell apart."""
    from investment_risk.scoring.pipeline import ScoreConfig, score

    root, _, _ = calibrated
    inputs, out = str(root / "data" / "test.parquet"), tmp_path / "scale"
    score(ScoreConfig(model=root / "model", inputs=(inputs,), out=out, shard_count=2, shard_index=0))
    result = runner.invoke(main, ["score", "--model", str(root / "model"), "--input", inputs, "--out", str(out),
                                  "--shard-count", "2", "--shard-index", "1", "--no-calibration"])
    assert result.exit_code == 2 and "holds shards scored with calibration" in result.output, result.output
    assert not (out / "_done" / "part-00001").exists()
    with capture_logs() as logs:  # --force: the user redoes the shards one by one; until then, no batch
        merged = score(ScoreConfig(model=root / "model", inputs=(inputs,), out=out, shard_count=2, shard_index=1,
                                   calibration=False, force=True))
    assert merged["shards"] == 2 and merged["calibrated"] is None and not merged["complete"]
    assert "calibrations_mixed" in [e["event"] for e in logs]
    result = runner.invoke(main, ["score-merge", "--out", str(out), "--expect-shards", "2"])
    assert result.exit_code == 1 and "both with and without calibration" in result.output, result.output


def test_evaluate_and_a_scored_batch_of_the_same_file_agree_and_a_prefiltered_red_is_a_miss(calibrated, tmp_path):
    """A prefiltered article gets NOISE and no scores in `score`: `evaluate` leaves it out of the MAE and counts it
    as a NOISE prediction, so both report one MAE and one RED recall, and a false prefilter hit is a missed RED."""
    from investment_risk.evaluation.evaluate import evaluate_run
    from investment_risk.scoring.pipeline import ScoreConfig, score

    root, _, _ = calibrated
    table = pq.read_table(root / "data" / "test.parquet")
    red = {**table.slice(0, 1).to_pylist()[0], "id": "promo-red", "title": "This stock is about to skyrocket",
           **{d: 9.0 for d in DIMENSIONS}}
    labelled = tmp_path / "labelled.parquet"
    pq.write_table(pa.concat_tables([table, pa.Table.from_pylist([red], schema=table.schema)]), labelled)
    evaluated = evaluate_run(root / "model", labelled)
    merged = score(ScoreConfig(model=root / "model", inputs=(str(labelled),), out=tmp_path / "out"))
    assert evaluated["rows_prefiltered"] == merged["rows_prefiltered"] >= 1
    assert evaluated["mae"] == pytest.approx(merged["mae"], abs=1e-5)
    assert evaluated["decisions"]["confusion"] == merged["decisions"]["confusion"]
    names = evaluated["decisions"]["tiers"]
    assert evaluated["decisions"]["confusion"][names.index("RED")][names.index("NOISE")] >= 1  # the promo RED


def test_evaluate_reports_raw_and_calibrated_with_decision_metrics(calibrated, runner, tmp_path):
    root, _, _ = calibrated
    out = tmp_path / "eval.json"
    result = runner.invoke(main, ["evaluate", "--model", str(root / "model"), "--data",
                                  str(root / "data" / "test.parquet"), "--out", str(out), "--top-k", "10"])
    assert result.exit_code == 0, result.output
    events = assert_json_stdout(result)
    report = json.loads(out.read_text())
    assert report["calibration"] == "applied" and report["raw"]["mae"] != report["mae"]
    # tokenising is long work of its own (minutes for tens of thousands of articles): it reports progress
    [tokenised] = [e for e in events if e["event"] == "progress_done" and e["what"] == "evaluate: tokenise"]
    assert tokenised["done"] == tokenised["total"] == report["rows"]
    # a piped stdout gets every figure the terminal's table shows, not the overall MAE alone
    [evaluated] = [e for e in events if e["event"] == "evaluated"]
    for key in ("rmse", "per_dimension", "decisions", "raw", "calibration", "rows_prefiltered", "in_sample",
                "calibration_error"):
        assert evaluated[key] == report[key], key
    # calibration is judged by its own figure too, on both sides, and drawn beside --out
    assert set(report["per_dimension"][DIMENSIONS[0]]) >= {"bias", "calibration_error"}
    assert report["raw"]["calibration_error"] != report["calibration_error"]
    assert set(report["reliability"]) == set(DIMENSIONS) and "reliability" not in evaluated
    assert (tmp_path / "eval-reliability.png").stat().st_size > 0
    decisions = report["decisions"]
    assert decisions["ranking"]["k"] == 10 and set(decisions["spearman"]) == set(DIMENSIONS)
    assert sum(map(sum, decisions["confusion"])) == report["rows"] and "per_tier" in decisions
    assert (tmp_path / "eval-tiers.png").stat().st_size > 0
    result = runner.invoke(main, ["evaluate", "--model", str(root / "model"), "--data",
                                  str(root / "data" / "test.parquet"), "--top-k", "0"])
    assert result.exit_code == 2 and "--top-k" in result.output


def test_a_forced_export_over_a_refit_model_says_the_refit_goes(calibrated, runner, tmp_path):
    """export --force carries the run's calibration: a refit `calibrate` made on the model went without a word."""
    from investment_risk.export.onnx_export import warn_refit_replaced

    root, _, _ = calibrated
    model = tmp_path / "model"
    shutil.copytree(root / "model", model)
    with capture_logs() as logs:
        warn_refit_replaced(root / "run", model)  # the run's own calibration: nothing to say
    assert not [e for e in logs if e["event"] == "calibration_replaced"]
    data = str(root / "data" / "val.parquet")
    assert runner.invoke(main, ["calibrate", "--model", str(model), "--data", data]).exit_code == 0
    with capture_logs() as logs:
        warn_refit_replaced(root / "run", model)
    [warning] = [e for e in logs if e["event"] == "calibration_replaced"]
    assert warning["refit_on"] == data and f"calibrate --model {model} --data {data}" in warning["remedy"]


def test_calibrate_refits_an_exported_model_with_a_new_version(calibrated, runner, tmp_path):
    root, _, _ = calibrated
    model = tmp_path / "model"
    shutil.copytree(root / "model", model)
    before = describe_model(model).model_version
    # Refitted on the validation split, which holds prefiltered noise (the test split has none)
    result = runner.invoke(main, ["calibrate", "--model", str(model), "--data", str(root / "data" / "val.parquet")])
    assert result.exit_code == 0, result.output
    [calibrated_event] = [e for e in assert_json_stdout(result) if e["event"] == "calibrated"]
    assert calibrated_event == assert_json_stdout(result)[-1]
    assert calibrated_event["calibration_error_calibrated_in_sample"] < calibrated_event["calibration_error_raw"]
    after = describe_model(model)  # model.json's sha256 matches the new file
    assert after.model_version != before and after.calibration is not None
    fitted_on = json.loads((model / CALIBRATION_FILE).read_text())["fitted_on"]
    val = pq.read_table(root / "data" / "val.parquet")
    left_out = int(default_spec().prefiltered(val).sum())
    assert fitted_on["split"] == "refit" and left_out >= 1 and fitted_on["rows"] == val.num_rows - left_out
    assert not list(model.glob(".*tmp"))
    # The drift reference was made of the old calibration's scores: redone with the new one, the validation split
    # it was made from still shows no drift (the old one gave PSI of several units on every dimension).
    assert after.reference["source"] == "validation split, recalibrated"
    entry = json.loads((model / "model.json").read_text())["reference"]  # model.json's distributions: the new ones
    assert entry["histograms"] == after.reference["histograms"] and entry["tier_shares"] == after.reference["tier_shares"]
    result = runner.invoke(main, ["score", "--model", str(model), "--input", str(root / "data" / "val.parquet"),
                                  "--out", str(tmp_path / "scored")])
    assert result.exit_code == 0, result.output
    psi = json.loads((tmp_path / "scored" / "metrics.json").read_text())["drift"]["psi"]
    assert max(psi.values()) < 0.01, psi


def test_calibrate_drops_a_reference_it_cannot_redo(calibrated, runner, tmp_path):
    root, _, _ = calibrated
    model = tmp_path / "model"
    shutil.copytree(root / "model", model)
    reference = json.loads((model / "reference.json").read_text())
    del reference["raw_scores"]  # as exported before references kept them
    (model / "reference.json").write_text(json.dumps(reference))
    info = json.loads((model / "model.json").read_text())
    info["sha256"]["reference.json"] = __import__("hashlib").sha256((model / "reference.json").read_bytes()).hexdigest()
    from investment_risk.modeling.description import model_version
    info["model_version"] = model_version(info["sha256"])  # as that export wrote them
    (model / "model.json").write_text(json.dumps(info))
    result = runner.invoke(main, ["calibrate", "--model", str(model), "--data", str(root / "data" / "test.parquet")])
    assert result.exit_code == 0, result.output
    assert "reference_dropped" in result.output and not (model / "reference.json").exists()
    assert describe_model(model).reference is None  # drift is then skipped, not reported falsely


def test_calibrate_refuses_unlabelled_or_too_small_data(calibrated, runner, tmp_path):
    root, _, _ = calibrated
    table = pq.read_table(root / "data" / "test.parquet")
    pq.write_table(table.select(["id", "title", "content"]), tmp_path / "nolabels.parquet")
    pq.write_table(table.slice(0, MIN_ROWS - 1), tmp_path / "few.parquet")
    for name, message in (("nolabels.parquet", "missing required column"), ("few.parquet", f"at least {MIN_ROWS}")):
        result = runner.invoke(main, ["calibrate", "--model", str(root / "run"), "--data", str(tmp_path / name)])
        assert result.exit_code == 2 and message in result.output and name in result.output, result.output


def test_calibrate_of_a_model_it_cannot_write_stops_before_scoring(calibrated, runner, tmp_path, monkeypatch):
    # A model on a read-only mount: the scoring ran for minutes, then the first staged file failed (EROFS)
    import os

    from investment_risk.core import atomic
    from investment_risk.evaluation import calibrate

    root, _, _ = calibrated
    model = tmp_path / "model"
    shutil.copytree(root / "model", model)
    real_access = os.access
    monkeypatch.setattr(atomic.os, "access", lambda path, mode: (real_access(path, mode) and not (
        Path(path) == model and mode & os.W_OK)))
    scored = []
    monkeypatch.setattr(calibrate, "raw_scores", lambda *args, **kwargs: scored.append(args))
    result = runner.invoke(main, ["calibrate", "--model", str(model), "--data", str(root / "data" / "val.parquet")])
    assert result.exit_code == 2 and f"{model} is not writable" in result.output and scored == [], result.output
    # a run: its model/ writable, the run's folder (training_metadata.json records the refit) not
    model = tmp_path / "run"
    shutil.copytree(root / "run", model)
    result = runner.invoke(main, ["calibrate", "--model", str(model), "--data", str(root / "data" / "val.parquet")])
    assert result.exit_code == 2 and f"{model} is not writable" in result.output and scored == [], result.output


def test_a_broken_calibration_in_a_run_stops_scoring_with_exit_2(calibrated, runner, tmp_path):
    root, _, _ = calibrated
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    data = json.loads((run / "model" / CALIBRATION_FILE).read_text())
    data["dimensions"]["macro_risk_severity"]["y"] = list(reversed(data["dimensions"]["macro_risk_severity"]["y"]))
    (run / "model" / CALIBRATION_FILE).write_text(json.dumps(data))
    result = runner.invoke(main, ["score", "--model", str(run), "--backend", "torch", "--input",
                                  str(root / "data" / "test.parquet"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and CALIBRATION_FILE in result.output and "monotone" in result.output


class Killed(BaseException):
    """A SIGKILL, as a test can take one: no handler of the code under test catches it."""


@pytest.mark.parametrize("point", ["before_rename:*/.replace-journal.json", "after_rename:*/.replace-journal.json",
                                   "after_rename:*/calibration.json", "after_rename:*/reference.json"])
def test_a_calibrate_killed_between_its_renames_leaves_the_old_model_or_the_new_one(calibrated, tmp_path, point,
                                                                                     monkeypatch):
    # The three files were renamed one after another: a kill between them left a model.json whose sha256 matched
    # neither set, which no command could read again and calibrate could not redo (only a re-export mended it).
    from investment_risk.core import faults
    from investment_risk.evaluation.calibrate import recalibrate

    root, _, _ = calibrated
    data = root / "data" / "val.parquet"
    unbroken, model = tmp_path / "unbroken", tmp_path / "model"
    shutil.copytree(root / "model", unbroken)
    shutil.copytree(root / "model", model)
    old, new = describe_model(model).model_version, recalibrate(unbroken, data, device="cpu")["model_version"]

    def kill() -> None:
        raise Killed

    monkeypatch.setattr(faults, "kill_now", kill)
    monkeypatch.setenv("_INVESTMENT_RISK_KILL_AT", point)
    with pytest.raises(Killed):
        recalibrate(model, data, device="cpu")
    monkeypatch.delenv("_INVESTMENT_RISK_KILL_AT")
    survived = describe_model(model)  # what every reader does first: a journal is rolled forward
    assert survived.model_version == (old if point.startswith("before") else new)
    for name in ("calibration.json", "reference.json", "model.json"):
        assert (model / name).read_bytes() == ((root / "model" if point.startswith("before") else unbroken) / name
                                               ).read_bytes(), name
    assert recalibrate(model, data, device="cpu")["model_version"] == new  # and calibrate runs again
    assert sorted(p.name for p in model.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("step", ["model_digest", "load_calibration"])
def test_a_model_whose_calibrate_lands_while_it_is_read_is_read_again(calibrated, tmp_path, monkeypatch, step):
    # A calibrate's renames landing between the reader's steps: after model.json was read and before the files
    # were hashed, the model was refused ("re-export the model"); after the hash and before the calibration was
    # parsed, the description paired the old model_version with the new calibration.
    from investment_risk.evaluation.calibrate import recalibrate
    from investment_risk.modeling import description

    root, _, _ = calibrated
    unbroken, model = tmp_path / "unbroken", tmp_path / "model"
    shutil.copytree(root / "model", unbroken)
    shutil.copytree(root / "model", model)
    new = recalibrate(unbroken, root / "data" / "val.parquet", device="cpu")["model_version"]
    original, swapped = getattr(description, step), []

    def calibrate_lands_first(directory):
        if not swapped:
            for name in ("calibration.json", "reference.json", "model.json"):
                shutil.copy(unbroken / name, model / name)
            swapped.append(True)
        return original(directory)

    monkeypatch.setattr(description, step, calibrate_lands_first)
    read = describe_model(model)
    assert swapped and read.model_version == new and read.calibration.fitted_on["split"] == "refit"


@pytest.mark.parametrize("point, readable", [("after_rename:*/model.json", True),
                                             ("after_rename:*/.replace-journal.json", False)])
def test_a_read_only_reader_of_a_killed_calibrate(calibrated, tmp_path, monkeypatch, point, readable):
    # On a read-only mount a reader cannot finish the change: a journal whose renames were all done (killed before
    # removing it) is no obstacle, the files are the new set; one with renames to do is refused in one line.
    import errno

    from investment_risk.core import faults
    from investment_risk.evaluation.calibrate import recalibrate
    from investment_risk.modeling import description

    root, _, _ = calibrated
    model = tmp_path / "model"
    shutil.copytree(root / "model", model)

    def kill() -> None:
        raise Killed

    monkeypatch.setattr(faults, "kill_now", kill)
    monkeypatch.setenv("_INVESTMENT_RISK_KILL_AT", point)
    with pytest.raises(Killed):
        recalibrate(model, root / "data" / "val.parquet", device="cpu")
    monkeypatch.delenv("_INVESTMENT_RISK_KILL_AT")

    def read_only(folder):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(description, "finish_replace", read_only)
    monkeypatch.setattr(description, "JOURNAL_WAIT_S", 0.3)
    if readable:
        assert describe_model(model).calibration.fitted_on["split"] == "refit"
    else:
        with pytest.raises(InputError, match="cannot be completed here"):
            describe_model(model)


def test_a_reader_finishing_an_old_journal_leaves_a_newer_one_alone(tmp_path, monkeypatch):
    # A reader that rolled a change forward and then removed the journal by name removed the next change's: that
    # calibrate reported its new version while the model kept the old one.
    from investment_risk.core import atomic

    folder = tmp_path / "m"
    folder.mkdir()
    atomic.replace_files_together(folder, {"a.json": "1", "b.json": "1"})
    (folder / ".a.json.staged-x").write_text("2")
    atomic.write_json_atomic({"files": {"a.json": ".a.json.staged-x"}}, folder / atomic.REPLACE_JOURNAL)
    apply = atomic._apply_journal

    def next_change_lands_meanwhile(target, files):
        apply(target, files)
        atomic.write_json_atomic({"files": {"b.json": None}}, target / atomic.REPLACE_JOURNAL)

    monkeypatch.setattr(atomic, "_apply_journal", next_change_lands_meanwhile)
    assert atomic.finish_replace(folder) and (folder / "a.json").read_text() == "2"
    monkeypatch.undo()
    assert (folder / atomic.REPLACE_JOURNAL).exists()  # the newer journal stays, for its writer or the next reader
    assert atomic.finish_replace(folder) and not (folder / "b.json").exists()
    assert not atomic.finish_replace(folder)  # none left


def test_calibrating_a_run_gives_it_a_new_version_and_records_the_refit(calibrated, runner, tmp_path):
    # A run's version was its name alone: batches scored before and after a refit could not be told apart, and a
    # merge of shards scored on both sides of it called itself one model's batch.
    root, _, _ = calibrated
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    before = describe_model(run).model_version
    assert before.startswith("run:run@")
    result = runner.invoke(main, ["calibrate", "--model", str(run), "--data", str(root / "data" / "test.parquet")])
    assert result.exit_code == 0, result.output
    after = describe_model(run).model_version
    assert after != before and after.startswith("run:run@")
    recorded = json.loads((run / "training_metadata.json").read_text())
    assert recorded["recalibrated"]["model_version"] == after and recorded["recalibrated"]["split"] == "refit"
    assert recorded["calibration"]["fitted"]  # what training fitted stays on record beside it


def test_in_sample_figures_are_named_as_such(calibrated, runner, tmp_path):
    # Calibrating on the training split, or evaluating on the split the model or its calibration was fitted on,
    # gave figures that read as a new data's without a word.
    root, _, _ = calibrated
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    seen = {}
    for split in ("train", "val", "test"):
        out = tmp_path / f"{split}.json"
        result = runner.invoke(main, ["evaluate", "--model", str(run), "--data", str(root / "data" / f"{split}.parquet"),
                                      "--out", str(out)])
        assert result.exit_code == 0, result.output
        seen[split] = json.loads(out.read_text())["in_sample"]
        assert ("evaluated_in_sample" in result.output) == bool(seen[split])
    assert seen == {"train": ["trained on it"], "val": ["calibration fitted on it"], "test": []}
    result = runner.invoke(main, ["calibrate", "--model", str(run), "--data", str(root / "data" / "train.parquet")])
    assert result.exit_code == 0 and "calibration_on_training_data" in result.output, result.output
    result = runner.invoke(main, ["evaluate", "--model", str(run), "--data", str(root / "data" / "train.parquet"),
                                  "--out", str(tmp_path / "again.json")])
    assert json.loads((tmp_path / "again.json").read_text())["in_sample"] == ["trained on it", "calibration fitted on it"]
    result = runner.invoke(main, ["evaluate", "--model", str(run), "--data", str(root / "data" / "train.parquet"),
                                  "--out", str(tmp_path / "off.json"), "--no-calibration"])
    assert json.loads((tmp_path / "off.json").read_text())["in_sample"] == ["trained on it"]


def test_evaluate_refuses_an_out_it_cannot_write_before_it_scores(calibrated, runner, tmp_path):
    root, _, _ = calibrated
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "x.json"  # it scored every row, then said only "afile: File exists"
    result = runner.invoke(main, ["evaluate", "--model", str(root / "model"), "--data",
                                  str(root / "data" / "test.parquet"), "--out", str(out)])
    assert result.exit_code == 2 and f"--out {out}: {tmp_path / 'afile'} is a file" in result.output, result.output
    assert '"progress' not in result.output  # refused before any scoring


# --- dimension redundancy --------------------------------------------------------------------------------------

def test_report_dimensions_finds_a_redundant_pair(runner, tmp_path):
    table = generate(SynthConfig(rows=200, seed=5))
    twin = table.column("macro_risk_severity")
    table = table.set_column(table.column_names.index("systemic_risk"), "systemic_risk", twin)
    pq.write_table(table, tmp_path / "labelled.parquet")
    result = runner.invoke(main, ["report", "dimensions", "--data", str(tmp_path / "labelled.parquet"),
                                  "--out", str(tmp_path / "dims")])
    assert result.exit_code == 0, result.output
    assert [e["event"] for e in assert_json_stdout(result)] == ["dimensions_written"]
    analysis = json.loads((tmp_path / "dims" / "dimensions.json").read_text())
    pairs = {(p["a"], p["b"]) for p in analysis["strong_pairs"]}
    assert ("macro_risk_severity", "systemic_risk") in pairs
    assert sum(analysis["explained_variance"]) == pytest.approx(1.0, abs=1e-3)
    for name in ("dimensions.md", "dimension_correlations.png", "dimension_variance.png"):
        assert (tmp_path / "dims" / name).stat().st_size > 0
    assert not analysis["too_few_rows"] and "Too few rows" not in (tmp_path / "dims" / "dimensions.md").read_text()


def test_report_dimensions_says_when_a_handful_of_rows_cannot_tell(runner, tmp_path):
    # Three rows gave 18 of 28 pairs "strongly correlated" and a first component explaining nearly everything.
    pq.write_table(generate(SynthConfig(rows=3, seed=5)), tmp_path / "few.parquet")
    result = runner.invoke(main, ["report", "dimensions", "--data", str(tmp_path / "few.parquet"),
                                  "--out", str(tmp_path / "dims")])
    assert result.exit_code == 0, result.output
    assert "dimensions_too_few_rows" in result.output
    analysis = json.loads((tmp_path / "dims" / "dimensions.json").read_text())
    assert analysis["too_few_rows"] and analysis["chance_r"] == 1.0  # 2/sqrt(3) > 1: any correlation at all
    assert "Too few rows to read much into" in (tmp_path / "dims" / "dimensions.md").read_text()
    pq.write_table(generate(SynthConfig(rows=1, seed=5)), tmp_path / "one.parquet")  # no components at all
    result = runner.invoke(main, ["report", "dimensions", "--data", str(tmp_path / "one.parquet"),
                                  "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    assert "1 labelled articles. Too few rows for principal components" in (tmp_path / "one" / "dimensions.md").read_text()


def test_head_tail_truncation_keeps_both_ends(tmp_path):
    from investment_risk.modeling.tiny import tiny_tokenizer
    from investment_risk.modeling.tokens import encode

    tokenizer = tiny_tokenizer(tmp_path)
    text = "start " + " ".join(f"w{i}" for i in range(300)) + " finish"
    head = encode(tokenizer, [text], 40)[0]
    both = encode(tokenizer, [text], 40, truncation="head-tail")[0]
    assert len(head) == len(both) == 40
    assert "start" in tokenizer.decode(both[:5]) and "finish" in tokenizer.decode(both[-5:])
    assert "finish" not in tokenizer.decode(head)
    short = encode(tokenizer, ["a short one"], 40, truncation="head-tail")[0]
    assert list(short) == list(encode(tokenizer, ["a short one"], 40)[0])  # nothing to cut: same as head
