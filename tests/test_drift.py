"""Drift: a reference with every exported model, PSI in every merged batch, `report drift`."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from structlog.testing import capture_logs

from investment_risk.cli import main
from investment_risk.core.drift import REFERENCE_FILE, SCORE_EDGES, drift, psi, psi_noise, score_histograms
from investment_risk.core.spec import DIMENSIONS
from investment_risk.modeling.description import describe_model
from investment_risk.scoring.pipeline import ScoreConfig, score

from .conftest import assert_json_stdout


def test_psi_is_near_zero_for_the_same_distribution_and_large_for_a_shift():
    rng = np.random.default_rng(0)
    base = rng.normal(4, 1.5, size=(5000, 8)).clip(0, 10)
    fresh = rng.normal(4, 1.5, size=(5000, 8)).clip(0, 10)
    shifted = fresh.copy()
    shifted[:, 0] = (shifted[:, 0] + 2).clip(0, 10)  # macro risk two points higher
    a, b, c = score_histograms(base), score_histograms(fresh), score_histograms(shifted)
    assert all(psi(a[d], b[d]) < 0.02 for d in DIMENSIONS)
    assert psi(a[DIMENSIONS[0]], c[DIMENSIONS[0]]) > 0.25 and psi(a[DIMENSIONS[1]], c[DIMENSIONS[1]]) < 0.02
    assert psi([0] * 10, b[DIMENSIONS[0]]) is None


def test_a_small_batch_from_the_same_distribution_is_not_flagged_and_a_shifted_one_is():
    rng = np.random.default_rng(1)
    reference = {"histograms": score_histograms(rng.normal(4, 1.5, size=(400, 8)).clip(0, 10)), "tier_shares": {}}
    false_alarms = 0
    for _ in range(20):  # fifty articles a night from the reference's own distribution
        night = rng.normal(4, 1.5, size=(50, 8)).clip(0, 10)
        result = drift(reference, score_histograms(night), {}, threshold=0.2)
        assert result["rows"] == 50
        false_alarms += sum(v > 0.2 for v in result["psi"].values())  # what the threshold alone would flag
        assert result["drifted_dimensions"] == []
    assert false_alarms > 20  # the threshold alone flagged drift on most nights
    shifted = rng.normal(4, 1.5, size=(50, 8)).clip(0, 10)
    shifted[:, 0] = (shifted[:, 0] + 4).clip(0, 10)
    result = drift(reference, score_histograms(shifted), {}, threshold=0.2)
    assert result["drifted_dimensions"] == [DIMENSIONS[0]]
    assert result["psi"][DIMENSIONS[0]] > result["psi_noise"][DIMENSIONS[0]] > 0.2
    # Noise shrinks as the batch grows, and the same counts give the same answer.
    hist = reference["histograms"][DIMENSIONS[0]]
    assert psi_noise(hist, 50) > psi_noise(hist, 500) > psi_noise(hist, 5000)
    assert psi_noise(hist, 50) == psi_noise(hist, 50) and psi_noise([0] * 10, 50) is None


def test_export_stores_the_reference_and_the_merge_measures_drift(exported, split_dir, tmp_path):
    _, exported_model, info = exported
    assert info["reference"]["rows"] > 0 and REFERENCE_FILE in info["sha256"]
    reference = json.loads((exported_model / REFERENCE_FILE).read_text())
    assert reference["edges"] == SCORE_EDGES and set(reference["histograms"]) == set(DIMENSIONS)
    assert describe_model(exported_model).reference == reference
    # model.json holds the score distributions too (the contract), the raw scores only the file
    assert {k: info["reference"][k] for k in ("edges", "histograms", "tier_shares", "rows")} == {
        k: reference[k] for k in ("edges", "histograms", "tier_shares", "rows")} and "raw_scores" not in info["reference"]
    # A reference whose first dimension sat in the top bin: tonight's scores of it are elsewhere, a real shift.
    model = tmp_path / "model"
    shutil.copytree(exported_model, model)
    histogram = reference["histograms"][DIMENSIONS[0]]
    reference["histograms"][DIMENSIONS[0]] = [0] * (len(histogram) - 1) + [sum(histogram)]
    (model / REFERENCE_FILE).write_text(json.dumps(reference))
    info = json.loads((model / "model.json").read_text())
    info["sha256"][REFERENCE_FILE] = hashlib.sha256((model / REFERENCE_FILE).read_bytes()).hexdigest()
    from investment_risk.modeling.description import model_version
    info["model_version"] = model_version(info["sha256"])  # as an export with this reference writes it
    (model / "model.json").write_text(json.dumps(info))
    with capture_logs() as logs:
        merged = score(ScoreConfig(model=model, inputs=(str(split_dir / "test.parquet"),), out=tmp_path / "out"))
    result = merged["drift"]
    assert set(result["psi"]) == set(DIMENSIONS) == set(result["psi_noise"])
    # The shifted dimension, and no other: a few dozen rows put others over the threshold by sampling alone.
    assert result["drifted_dimensions"] == [DIMENSIONS[0]]
    drifted = [e["dimension"] for e in logs if e["event"] == "drift_detected"]
    assert drifted == result["drifted_dimensions"]  # every flagged dimension is named in a warning
    assert all(e["log_level"] == "warning" for e in logs if e["event"] == "drift_detected")
    assert merged["prefilter_rate"] is not None and merged["reject_rate"] == 0
    # Each shard's metrics carry the reference's distributions, not its raw scores (a row per validation article)
    shard = json.loads(next((tmp_path / "out" / "metrics").glob("part-*.json")).read_text())
    assert shard["reference"]["histograms"] == reference["histograms"] and "raw_scores" not in shard["reference"]


def test_the_validation_split_scored_as_a_batch_does_not_drift_from_the_reference(exported, split_dir, tmp_path):
    # The reference came from the fp32 graph while batches ran on the engine export chose (int8 here): the very
    # articles it was made of showed a PSI and a tier shift every night.
    _, model, _ = exported
    reference = json.loads((model / REFERENCE_FILE).read_text())
    with capture_logs() as logs:
        merged = score(ScoreConfig(model=model, inputs=(str(split_dir / "val.parquet"),), out=tmp_path / "val"))
    [start] = [e for e in logs if e["event"] == "shard_start"]
    assert reference["engine"] == start["provider"]
    assert max(merged["drift"]["psi"].values()) == pytest.approx(0.0, abs=1e-9)
    assert all(shift == pytest.approx(0.0, abs=1e-9) for shift in merged["drift"]["tier_share_shift"].values())


def test_report_drift_against_the_model_and_bad_inputs(exported, split_dir, tmp_path, runner):
    _, model, _ = exported
    score(ScoreConfig(model=model, inputs=(str(split_dir / "test.parquet"),), out=tmp_path / "batch"))
    result = runner.invoke(main, ["report", "drift", "--reference", str(model), "--current", str(tmp_path / "batch"),
                                  "--out", str(tmp_path / "drift")])
    assert result.exit_code == 0, result.output
    assert [e["event"] for e in assert_json_stdout(result)] == ["drift_written"]
    report = json.loads((tmp_path / "drift" / "drift.json").read_text())
    assert set(report["psi"]) == set(DIMENSIONS)
    assert "| dimension | PSI |" in (tmp_path / "drift" / "drift.md").read_text()
    assert (tmp_path / "drift" / "drift_histograms.png").stat().st_size > 0
    # A batch as the reference: the same batch does not drift from itself.
    result = runner.invoke(main, ["report", "drift", "--reference", str(tmp_path / "batch"), "--current",
                                  str(tmp_path / "batch"), "--out", str(tmp_path / "self")])
    assert result.exit_code == 0, result.output
    assert all(v == pytest.approx(0, abs=1e-12) for v in json.loads((tmp_path / "self" / "drift.json").read_text())["psi"].values() if v is not None)
    for args, message in ((["--reference", str(split_dir)], "neither an exported model"),
                          (["--reference", str(model), "--psi-threshold", "0"], "(0, 10]"),
                          (["--reference", str(model), "--psi-threshold", "11"], "(0, 10]")):
        result = runner.invoke(main, ["report", "drift", "--current", str(tmp_path / "batch"), "--out",
                                      str(tmp_path / "x"), *args])
        assert result.exit_code == 2 and message in result.output, result.output
    result = runner.invoke(main, ["report", "drift", "--reference", str(model), "--current", str(split_dir),
                                  "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "not a scoring output directory" in result.output
    # Another model's scores (or this model's before a recalibration), or a batch of several: the PSI would
    # measure the model, not the articles; the merge measures no drift for a mixed batch either
    for versions, message in ((["other"], "compare batches of one model version"),
                              (["a", "b"], "several model versions (a, b)")):
        other = tmp_path / f"other-{len(versions)}"
        shutil.copytree(tmp_path / "batch", other)
        metrics = json.loads((other / "metrics.json").read_text())
        (other / "metrics.json").write_text(json.dumps({**metrics, "model_versions": versions}))
        for reference, current in ((model, other), (tmp_path / "batch", other), (other, tmp_path / "batch")):
            result = runner.invoke(main, ["report", "drift", "--reference", str(reference), "--current",
                                          str(current), "--out", str(tmp_path / "x")])
            assert result.exit_code == 2 and message in result.output, (reference, current, result.output)
    # A damaged `calibrated` was a KeyError traceback and exit 1 (retried as if the cluster were at fault)
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "batch", damaged)
    metrics = json.loads((damaged / "metrics.json").read_text())
    (damaged / "metrics.json").write_text(json.dumps({**metrics, "calibrated": "true"}))
    result = runner.invoke(main, ["report", "drift", "--reference", str(model), "--current", str(damaged),
                                  "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "calibrated is 'true'" in result.output, result.output
    # Every row prefiltered: no distribution, so no PSI (the merge measures none), not a -100 % tier shift
    noise = tmp_path / "noise.jsonl"
    noise.write_text("".join(json.dumps({"id": str(i), "title": "This coin is going to the moon", "content": "Get in now."})
                             + "\n" for i in range(3)))
    score(ScoreConfig(model=model, inputs=(str(noise),), out=tmp_path / "noise"))
    for reference, current in ((model, tmp_path / "noise"), (tmp_path / "noise", tmp_path / "batch")):
        result = runner.invoke(main, ["report", "drift", "--reference", str(reference), "--current", str(current),
                                      "--out", str(tmp_path / "x")])
        assert result.exit_code == 2 and f"{tmp_path / 'noise'}: no model-scored rows" in result.output, result.output
    assert not (tmp_path / "x").exists()


def test_a_psi_threshold_outside_the_range_is_refused(exported, split_dir, tmp_path, runner):
    _, model, _ = exported
    for bad in ("0", "-1", "10.5"):
        result = runner.invoke(main, ["score", "--model", str(model), "--input", str(split_dir / "test.parquet"),
                                      "--out", str(tmp_path / "out"), "--psi-threshold", bad])
        assert result.exit_code == 2 and "--psi-threshold" in result.output, result.output


def test_a_reference_that_mixes_calibrated_and_raw_scores_is_never_compared():
    """A scored batch of both kinds (`calibrated: null` in its metrics) as the reference of `report drift`."""
    from investment_risk.core.drift import calibration_mismatch

    mixed = {"calibrated": None}
    assert calibration_mismatch(mixed, False) == calibration_mismatch(mixed, True) == (
        "the reference mixes calibrated and raw scores")
    assert calibration_mismatch({"calibrated": True}, True) == "" == calibration_mismatch({}, False)


def test_a_recalibrated_reference_bins_each_raw_score_as_scoring_does():
    """Raw scores kept whole through the reference's JSON: one fitted at an isotonic breakpoint, where the map climbs
    steeply, lands in the bin scoring puts it in (rounded to 5 decimals it fell a bin lower)."""
    from investment_risk.core.drift import make_reference, recalibrated_reference

    raw = np.full((4, len(DIMENSIONS)), 3.0, dtype=np.float32)
    raw[0, 1] = np.float32(3.5697443)
    steep = np.float32(3.5697443)

    def calibrate(r):
        return np.where(r >= steep, 8.0, 7.9).astype(np.float32)

    stored = json.loads(json.dumps(make_reference(calibrate(raw), ["GREEN"] * 4, "validation split", True, raw)))
    redone = recalibrated_reference(stored, calibrate)
    assert redone["histograms"] == score_histograms(calibrate(raw))
    assert redone["histograms"][DIMENSIONS[1]][8] == 1  # the 8.0 bin, as scoring bins it
