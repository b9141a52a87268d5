import numpy as np
import pytest

from investment_risk.core.spec import DIMENSIONS, default_spec
from investment_risk.datasets.synth import PHRASES, UPPER_HALF, UPPER_HALF_QUALITY, SynthConfig, generate


def labels(table) -> np.ndarray:
    return np.stack([table.column(d).to_numpy() for d in DIMENSIONS], axis=1)


def test_deterministic_in_seed(synth_table):
    again = generate(SynthConfig(rows=400, seed=7))
    assert again.equals(synth_table)
    assert not generate(SynthConfig(rows=400, seed=8)).equals(synth_table)


def test_schema_and_label_range(synth_table):
    for column in ("id", "title", "content", "source", "url", "published_at", "language", "reasoning", *DIMENSIONS):
        assert column in synth_table.column_names
    y = labels(synth_table)
    assert not np.isnan(y).any()
    # Labels spread over the scale (a model has something to learn), one decimal as the oracle writes them.
    assert (y.min(axis=0) < 2.5).all() and (y.max(axis=0) > 7.5).all() and (y.std(axis=0) > 1.0).all()
    assert np.allclose(y, y.round(1))
    assert len(set(synth_table.column("id").to_pylist())) == synth_table.num_rows


def test_length_spread():
    table = generate(SynthConfig(rows=1500, seed=3))
    words = np.array([len(c.split()) for c in table.column("content").to_pylist()])
    assert ((words >= 150) & (words <= 900)).mean() > 0.75
    assert (words > 3000).sum() >= 10


def test_noise_articles_are_caught_by_the_prefilter(synth_table):
    spec = default_spec()
    kinds = synth_table.column("kind").to_pylist()
    hits = [spec.prefilter_reason(t, c) is not None for t, c in
            zip(synth_table.column("title").to_pylist(), synth_table.column("content").to_pylist())]
    noise = [h for h, k in zip(hits, kinds) if k == "noise"]
    articles = [h for h, k in zip(hits, kinds) if k == "article"]
    assert len(noise) >= 10 and sum(noise) == len(noise)
    assert sum(articles) == 0


def test_duplicates_present():
    table = generate(SynthConfig(rows=1000, seed=5))
    kinds = table.column("kind").to_pylist()
    assert kinds.count("duplicate") >= 3 and kinds.count("near_duplicate") >= 3
    contents = table.column("content").to_pylist()
    exact = [c for c, k in zip(contents, kinds) if k == "duplicate"]
    assert all(contents.count(c) >= 2 for c in exact)


def test_reasoning_agrees_with_the_labels(synth_table):
    row = synth_table.slice(0, 1).to_pylist()[0]
    for dim in DIMENSIONS:
        assert f"({row[dim]:.1f})" in row["reasoning"]
    tiers, _ = default_spec().assign_tiers(labels(synth_table)[:1])
    assert f"a {tiers[0]} signal" in row["reasoning"]


def _phrase_features(texts: list[str]) -> np.ndarray:
    """What a reader of the lede sees: which level phrase of each dimension appears, and which half-level clause."""
    features = []
    for text in texts:
        lede = text.split("\n\n")[0]
        row = [1.0]
        for dim in DIMENSIONS:
            sentence = next((s for s in lede.split(". ") if s.startswith(PHRASES[dim][0])), "")
            row += [float(p in sentence) for p in PHRASES[dim][1]]
            row.append(float(any(c in sentence for c in UPPER_HALF + UPPER_HALF_QUALITY)))
        features.append(row)
    return np.array(features)


def test_labels_are_learnable_but_not_trivially():
    table = generate(SynthConfig(rows=3000, seed=11))
    keep = np.array([k == "article" for k in table.column("kind").to_pylist()])
    x = _phrase_features(table.column("content").to_pylist())[keep]
    y = labels(table)[keep]
    train, test = slice(0, 2000), slice(2000, None)
    weights, *_ = np.linalg.lstsq(x[train], y[train], rcond=None)
    mae = np.abs(x[test] @ weights - y[test]).mean()
    baseline = np.abs(y[train].mean(axis=0) - y[test]).mean()
    assert mae < 0.45 * baseline  # the text carries the scores ...
    assert mae > 0.25  # ... up to label noise a model cannot learn


def test_rows_must_be_positive():
    with pytest.raises(ValueError):
        generate(SynthConfig(rows=0))


@pytest.mark.parametrize("name", ["s.parquet", "s.jsonl", "s.ndjson"])
def test_what_synth_writes_the_readers_read_back(tmp_path, name):
    from investment_risk.datasets.readers import read_articles
    from investment_risk.datasets.synth import write_synthetic

    write_synthetic(SynthConfig(rows=20), tmp_path / name)
    assert read_articles([tmp_path / name]).num_rows == 20


def test_synth_refuses_a_name_no_reader_takes(runner, tmp_path):
    from investment_risk.cli import main

    for name in ("s.csv", "s.json"):  # .json: a folder of them would skip its rows as metadata
        result = runner.invoke(main, ["data", "synth", "--rows", "5", "--out", str(tmp_path / name)])
        assert result.exit_code == 2 and f"{name}: name a Parquet" in result.output
        assert not (tmp_path / name).exists()


def test_synth_reports_its_progress():
    """A million rows take half an hour: it said nothing until the end."""
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        generate(SynthConfig(rows=2500))
    [done] = [e for e in logs if e["event"] == "progress_done"]
    assert done["what"] == "synth" and done["done"] == done["total"] == 2500
