"""What calibration costs at scoring time (issue 14): `score` with and without calibration on the same input, same
model (the run exported to ONNX, default CPU engine), alternating, best of three; and the map alone timed on as many
rows. The input is the test split ten times over (fresh ids), so model loading does not swamp the comparison.
Run by bench/learning.sh after training.

    python bench/calibration.py RUN DATA_FILE OUT_JSON
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def main(run: Path, data: Path, out: Path) -> dict:
    from investment_risk.export.onnx_export import export_run
    from investment_risk.modeling.description import describe_model
    from investment_risk.scoring.pipeline import ScoreConfig, score

    import pyarrow as pa
    import pyarrow.parquet as pq

    model_dir = out.parent / "calibration-model"
    export_run(run, model_dir, force=True)
    table = pq.read_table(data)
    copies = [table.set_column(table.column_names.index("id"), "id",
                               pa.array([f"{i}-copy{c}" for i in table.column("id").to_pylist()], type=pa.string()))
              for c in range(10)]
    data = out.parent / "calibration-input.parquet"
    pq.write_table(pa.concat_tables(copies), data)
    seconds: dict[str, list[float]] = {"calibrated": [], "raw": []}
    for attempt in range(3):
        for name in ("raw", "calibrated"):
            target = out.parent / f"calibration-score-{name}-{attempt}"
            started = time.perf_counter()
            merged = score(ScoreConfig(model=model_dir, inputs=(str(data),), out=target, force=True,
                                       calibration=name == "calibrated"))
            seconds[name].append(time.perf_counter() - started)
    rows = merged["rows_in"]
    calibration = describe_model(model_dir).calibration
    scores = np.random.default_rng(0).uniform(0, 10, size=(rows, 8)).astype(np.float32)
    started = time.perf_counter()
    for _ in range(20):
        calibration.apply(scores)
    apply_seconds = (time.perf_counter() - started) / 20
    best = {k: min(v) for k, v in seconds.items()}
    result = {"rows": rows, "score_seconds_best_of_3": best,
              "calibration_overhead": round(best["calibrated"] / best["raw"] - 1, 4),
              "apply_seconds": apply_seconds, "apply_share_of_scoring": round(apply_seconds / best["raw"], 6),
              "target_overhead": 0.02}
    json.dump(result, open(out, "w"), indent=2)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
