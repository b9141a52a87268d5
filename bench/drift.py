"""Drift and Prometheus pushes, measured (issue 15): PSI of a fresh sample of the training distribution and of a
deliberately shifted one against the model's reference, and what the Pushgateway pushes add to a shard's wall time.

The shift: in a fresh synthetic sample, every macro-risk lede is rewritten to the most severe level ("is collapsing
into deep recession"), as if a recession scare filled tonight's news. Run by bench/learning.sh after training.

    python bench/drift.py MODEL_DIR OUT_JSON
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def shifted(table):
    import pyarrow as pa

    from investment_risk.datasets.synth import PHRASES

    predicates = PHRASES["macro_risk_severity"][1]
    worst = predicates[-1]

    def rewrite(text: str | None) -> str | None:
        for predicate in predicates[:-1]:
            text = text.replace(predicate, worst) if text else text
        return text

    for column in ("title", "content"):
        values = [rewrite(v) for v in table.column(column).to_pylist()]
        table = table.set_column(table.column_names.index(column), column, pa.array(values, type=pa.string()))
    return table


def main(model: Path, out: Path) -> dict:
    import pyarrow.parquet as pq

    from investment_risk.datasets.synth import SynthConfig, generate
    from investment_risk.scoring import prometheus
    from investment_risk.scoring.pipeline import ScoreConfig, score

    work = out.parent / "drift-bench"
    shutil.rmtree(work, ignore_errors=True)
    (work / "fresh").mkdir(parents=True)
    (work / "shifted").mkdir()
    fresh = generate(SynthConfig(rows=1000, seed=99))
    pq.write_table(fresh, work / "fresh" / "batch.parquet")
    pq.write_table(shifted(fresh), work / "shifted" / "batch.parquet")
    result: dict = {}
    for name in ("fresh", "shifted"):
        merged = score(ScoreConfig(model=model, inputs=(str(work / name),), out=work / f"scored-{name}"))
        result[f"psi_{name}"] = merged["drift"]["psi"]
        result[f"max_psi_{name}"] = max(v for v in merged["drift"]["psi"].values() if v is not None)
    # Pushes against a real Pushgateway on loopback: their time over the shard's wall time.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gateway = subprocess.Popen(["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{port}",
                                "--persistence.file="],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        pushed: list[float] = []
        original = prometheus.push

        def timed_push(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                pushed.append(time.perf_counter() - started)

        import investment_risk.scoring.pipeline as pipeline
        import investment_risk.scoring.shard_metrics as shard_metrics

        pipeline.push = shard_metrics.push = timed_push  # the shard's push, and the batch's (made by the merge)
        started = time.perf_counter()
        score(ScoreConfig(model=model, inputs=(str(work / "fresh"),), out=work / "scored-pushed",
                          pushgateway=f"http://127.0.0.1:{port}"))
        wall = time.perf_counter() - started
    finally:
        gateway.terminate()
        gateway.wait()
    result.update({"rows": fresh.num_rows, "shift": "every macro_risk_severity lede rewritten to its most severe level",
                   "push_seconds": sum(pushed), "pushes": len(pushed), "shard_wall_seconds": wall,
                   "push_share_of_shard": sum(pushed) / wall, "target_push_share": 0.01,
                   "target_fresh_max_psi": 0.1, "target_shifted_psi": 0.25})
    result["targets_met"] = (result["max_psi_fresh"] < 0.1 and result["psi_shifted"]["macro_risk_severity"] > 0.25
                             and result["push_share_of_shard"] < 0.01)
    json.dump(result, open(out, "w"), indent=2)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
