"""Fault injection for the scorer: SIGKILL at random moments and at named commit points, rerun, check.

A cycle scores a multi-file input (3 Parquet files with several row groups, a JSONL file with bad lines) into a
fresh directory as 2 shards, taking a checkpoint after every read batch: one shard's first run is killed (at a
random moment, or at a named point: between the rejects' and the part's renames, after the part's rename and before
`_done`, while writing metrics, after a checkpoint, between a segment and the checkpoint naming it), every shard is
then rerun to completion (reading on from its checkpoint), and the invariants are checked. Every fifth cycle instead races two scorers on the same
shard (a replaced pod that is still running). Invariants:
- every input row appears exactly once across the part files and the rejects;
- every visible output file is a whole Parquet/JSON file; `_done` exists only beside a whole part file;
- metrics.json agrees with the files (rows in, scored, rejected; complete);
- no temporary file, and no checkpoint, is left behind once every shard has rerun.

    python -m tests.chaos --cycles 200 --out bench-results/chaos.json     (make chaos)

The last line printed is `cycles=N violations=M`; the details go to the JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SHARDS = 2
POINTS = [
    "before_rename:out/_inputs.json",  # while the first shard writes the batch's listing
    "after_rename:rejects/part-0000{shard}.parquet",  # rejects committed, part not yet
    "after_rename:out/part-0000{shard}.parquet",  # part committed, no metrics, no _done
    "before_rename:metrics/part-0000{shard}.json",  # while writing metrics
    "after_rename:metrics/part-0000{shard}.json",  # metrics written, _done not yet
    "before_rename:metrics/part-0000{shard}.prom",  # the Prometheus textfile, through the same atomic writer
    "before_done:part-0000{shard}",
    "after_rename:_done/part-0000{shard}",  # done, merge not yet
    "after_checkpoint:part-0000{shard}",  # a checkpoint taken: the rerun reads on from it
    "before_rename:part-0000{shard}/state.json",  # a segment written, the checkpoint naming it not yet
]


def make_inputs(root: Path, seed: int = 5) -> tuple[Path, int]:
    """A multi-file input; returns its directory and its row count (bad JSONL lines count as rows)."""
    from investment_risk.datasets.synth import SynthConfig, generate

    inputs = root / "in"
    inputs.mkdir(parents=True)
    table = generate(SynthConfig(rows=180, seed=seed))
    for i in range(3):
        pq.write_table(table.slice(i * 50, 50), inputs / f"batch-{i}.parquet", row_group_size=17)
    lines = [json.dumps(r) for r in table.slice(150, 30).to_pylist()]
    lines[3] = '{"id": "broken", "title": '  # unparseable
    lines[7] = json.dumps({"id": "no-content", "title": "t", "content": None})
    (inputs / "late.jsonl").write_text("\n".join(lines) + "\n")
    return inputs, 180


def score_cmd(model: Path, inputs: Path, out: Path, shard: int) -> list[str]:
    return [sys.executable, "-m", "investment_risk", "--log-format", "json", "score", "--model", str(model),
            "--input", str(inputs), "--out", str(out), "--shard-index", str(shard), "--shard-count", str(SHARDS),
            "--device", "cpu", "--checkpoint-seconds", "0"]


def run(cmd: list[str], env: dict[str, str] | None = None, kill_after: float | None = None) -> int:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()
    return proc.returncode


def check(out: Path, total_rows: int, input_ids: set[str]) -> list[str]:
    """What is wrong with a finished output directory (empty when nothing is)."""
    problems = []
    tables = {}
    for path in sorted(out.rglob("*.parquet")):
        if path.name.startswith("."):
            continue  # a killed writer's temporary file: never read, never matched by part-*.parquet
        try:
            tables[path.relative_to(out).as_posix()] = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the violation being counted
            problems.append(f"{path.name}: not a valid Parquet file ({exc.__class__.__name__})")
    parts = [t for name, t in tables.items() if "/" not in name]
    rejects = [t for name, t in tables.items() if name.startswith("rejects/")]
    scored = pa.concat_tables(parts) if parts else None
    scored_ids = scored.column("id").to_pylist() if scored is not None else []
    reject_ids = [i for t in rejects for i in t.column("id").to_pylist()]
    rows_out = len(scored_ids) + sum(t.num_rows for t in rejects)
    if rows_out != total_rows:
        problems.append(f"rows out {rows_out} != rows in {total_rows}")
    if len(set(scored_ids)) != len(scored_ids):
        problems.append("an id was scored twice")
    if set(scored_ids) & {i for i in reject_ids if i}:
        problems.append("an id was both scored and rejected")
    seen = set(scored_ids) | {i for i in reject_ids if i}
    if not input_ids <= seen | {"broken", "no-content"}:
        problems.append(f"{len(input_ids - seen)} input ids lost")
    for shard in range(SHARDS):
        name = f"part-{shard:05d}"
        if (out / "_progress" / name).exists():
            problems.append(f"shard {shard}'s checkpoints are left behind")
        if not (out / "_done" / name).exists():
            problems.append(f"shard {shard} has no _done marker")
        elif f"{name}.parquet" not in tables:
            problems.append(f"shard {shard} is done without its part file")
    try:
        merged = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError) as exc:
        return problems + [f"metrics.json unreadable ({exc.__class__.__name__})"]
    expected = {"rows_in": total_rows, "rows_scored": len(scored_ids), "rows_rejected": rows_out - len(scored_ids),
                "shards": SHARDS, "complete": True}
    problems += [f"metrics.json {k}={merged.get(k)} but the files say {v}" for k, v in expected.items()
                 if merged.get(k) != v]
    return problems


def plan(n: int, rng: random.Random, typical_s: float) -> dict:
    """What cycle n does: every fifth races two scorers; the rest kill one shard at a point or a random moment."""
    shard = rng.randrange(SHARDS)
    if n % 5 == 4:
        return {"kind": "race", "shard": shard}
    if rng.random() < 0.5:
        return {"kind": "point", "shard": shard, "point": rng.choice(POINTS).format(shard=shard)}
    return {"kind": "random", "shard": shard, "after_s": round(rng.uniform(0.05, typical_s), 3)}


def cycle(n: int, plan: dict, model: Path, inputs: Path, total: int, ids: set[str], work: Path) -> dict:
    """Run one planned fault, rerun every shard to completion, and return what went wrong."""
    out = work / f"cycle-{n}" / "out"
    record: dict = {"cycle": n, **plan}
    cmd = score_cmd(model, inputs, out, plan["shard"])
    problems = []
    if plan["kind"] == "race":  # a replaced pod that is still running
        procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
        record["exit_codes"] = [p.wait() for p in procs]
        if any(record["exit_codes"]):
            problems.append(f"a racing scorer exited {record['exit_codes']}")
    elif plan["kind"] == "point":
        record["killed_exit_code"] = run(cmd, {"_INVESTMENT_RISK_KILL_AT": plan["point"]})
        if record["killed_exit_code"] != -9:  # a renamed point would otherwise make a cycle with no fault
            problems.append(f"the fault at {plan['point']} never fired (exit {record['killed_exit_code']})")
    else:
        record["killed_exit_code"] = run(cmd, kill_after=plan["after_s"])
    record["rerun_exit_codes"] = [run(score_cmd(model, inputs, out, s)) for s in range(SHARDS)]
    problems += [f"rerun of shard {s} exited {c}" for s, c in enumerate(record["rerun_exit_codes"]) if c != 0]
    problems += check(out, total, ids)
    # A killed writer's temporary file is removed when its destination is written again, as every rerun does.
    leftovers = sorted(p.relative_to(out).as_posix() for p in out.rglob(".*.tmp"))
    record["leftover_temp_files"] = len(leftovers)
    problems += [f"temporary file left behind: {name}" for name in leftovers]
    record["violations"] = problems
    shutil.rmtree(out.parent, ignore_errors=True)
    return record


def prepare(model: Path, work: Path) -> tuple[Path, int, set[str], float]:
    """Inputs, their row count and ids, and how long one clean shard run takes (checked for violations too)."""
    inputs, total = make_inputs(work)
    ids = set()
    for path in inputs.glob("*.parquet"):
        ids |= set(pq.read_table(path, columns=["id"]).column("id").to_pylist())
    for line in (inputs / "late.jsonl").read_text().splitlines():
        try:
            ids.add(json.loads(line)["id"])
        except ValueError:
            pass
    started = time.monotonic()
    baseline = work / "baseline"
    codes = [run(score_cmd(model, inputs, baseline, s)) for s in range(SHARDS)]
    problems = check(baseline, total, ids)
    if any(codes) or problems:
        raise RuntimeError(f"the scorer fails without faults (exit codes {codes}): {problems}")
    return inputs, total, ids, (time.monotonic() - started) / SHARDS


def run_chaos(model: Path, work: Path, cycles: int, seed: int, jobs: int = 1) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    started = time.monotonic()
    inputs, total, ids, typical_s = prepare(model, work)
    # Each cycle draws from its own generator, so a report can be replayed cycle by cycle with the same seed.
    plans = [plan(n, random.Random(f"{seed}-{n}"), typical_s) for n in range(cycles)]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        records = list(pool.map(lambda n: cycle(n, plans[n], model, inputs, total, ids, work), range(cycles)))
    return {"cycles": cycles, "violations": sum(len(r["violations"]) for r in records), "seed": seed, "jobs": jobs,
            "rows_per_cycle": total, "shards": SHARDS, "typical_run_s": round(typical_s, 2),
            "kinds": {k: sum(r["kind"] == k for r in records) for k in ("random", "point", "race")},
            "points": sorted({r["point"] for r in records if r["kind"] == "point"}),
            "wall_s": round(time.monotonic() - started, 1), "records": records}


def build_model(work: Path) -> Path:
    """A tiny distilled model, exported to ONNX (about half a minute on 2 cores)."""
    from investment_risk.export.onnx_export import export_run
    from investment_risk.datasets.split import SplitConfig, run_split
    from investment_risk.datasets.synth import SynthConfig, generate
    from investment_risk.training.config import TrainConfig
    from investment_risk.training.recipe import train

    pq.write_table(generate(SynthConfig(rows=120, seed=1)), work / "labelled.parquet")
    run_split([str(work / "labelled.parquet")], work / "split", SplitConfig(val=0.2, test=0.1, seed=1))
    train(TrainConfig(mode="distillation", base_model="tiny-qwen2", data=str(work / "split"), out=str(work / "run"),
                      epochs=1, batch_size=8, learning_rate=2e-3, max_length=64, warmup_steps=1, device="cpu"))
    export_run(work / "run", work / "model")
    return work / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--out", type=Path, default=Path("bench-results/chaos.json"))
    parser.add_argument("--jobs", type=int, default=2, help="Cycles run at once.")
    args = parser.parse_args()
    from investment_risk.core.logs import configure_logging

    configure_logging("json", "warning")
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        work = Path(tmp)
        report = run_chaos(build_model(work), work, args.cycles, args.seed, args.jobs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for record in report["records"]:
        for problem in record["violations"]:
            print(f"cycle {record['cycle']} ({record['kind']}): {problem}")
    print(f"details: {args.out}  seed={report['seed']}  wall={report['wall_s']}s  kinds={report['kinds']}")
    print(f"cycles={report['cycles']} violations={report['violations']}")
    raise SystemExit(1 if report["violations"] else 0)


if __name__ == "__main__":
    main()
