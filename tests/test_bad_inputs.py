"""The bad-input corpus: each case is a small input and what must happen to it.

Either the command stops with exit code 2 and a one-line message naming the file, row or option, or the batch is
scored with a reject row (and its reason) for each row that cannot be scored. For every batch case the row
invariant is checked: rows in = scored + rejected, no id is scored twice, and every input row is accounted for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from investment_risk.cli import main

GOOD = {"title": "Fed holds rates", "content": "Credit spreads widened as the Federal Reserve held rates steady."}


def rows(n: int, prefix: str = "r", **overrides) -> list[dict]:
    return [{"id": f"{prefix}{i}", **GOOD, **overrides} for i in range(n)]


def parquet(path: Path, records: list[dict], schema: pa.Schema | None = None) -> Path:
    pq.write_table(pa.Table.from_pylist(records, schema=schema), path)
    return path


def jsonl(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return path


@dataclass
class Case:
    name: str
    build: Callable[[Path], list[str]]  # writes the input under the directory, returns --input values
    exit_code: int = 0
    message: str = ""  # exit 2: in the error line
    rows_in: int = 0  # batch: every row read
    rejects: dict[str, int] = field(default_factory=dict)  # batch: reason fragment -> rows
    command: str = "score"
    scored_ids: tuple[str, ...] = ()  # batch: ids that must be in the part files
    blank_lines: int = 0  # batch: JSONL blank lines skipped (not rows)
    options: tuple[str, ...] = ()  # more options of the command


def _truncated(d: Path) -> list[str]:
    data = parquet(d / "t.parquet", rows(20)).read_bytes()
    (d / "t.parquet").write_bytes(data[: len(data) // 2])
    return [str(d / "t.parquet")]


def _magic(d: Path) -> list[str]:
    (d / "m.parquet").write_bytes(b"PK\x03\x04 this is a zip file, not Parquet" * 10)
    return [str(d / "m.parquet")]


def _schema_drift(d: Path) -> list[str]:
    parquet(d / "a.parquet", rows(3))
    parquet(d / "b.parquet", [{"id": "b0", "headline": "no title or content columns"}])
    return [str(d)]


def _nested(d: Path) -> list[str]:
    parquet(d / "n.parquet", [{"id": "n0", "title": "t", "content": ["a", "list", "of", "strings"]}])
    return [str(d / "n.parquet")]


def _huge(d: Path) -> list[str]:
    parquet(d / "h.parquet", rows(2) + [{"id": "huge", "title": "t", "content": "x" * 1_200_000}])
    return [str(d / "h.parquet")]


def _bad_utf8(d: Path) -> list[str]:
    return [str(jsonl(d / "u.jsonl", [json.dumps(r) for r in rows(2)] + [b'{"id": "u", "title": "\xff\xfe bad"}']))]


def _repeated_keys(d: Path) -> list[str]:
    # which id is the article's is a guess: json.loads took the last ("9") and scored it without a word
    line = '{"id": "1", "title": "t", "content": "some words", "id": "9"}'
    return [str(jsonl(d / "k.jsonl", [json.dumps(r) for r in rows(2)] + [line]))]


def _nul(d: Path) -> list[str]:
    return [str(parquet(d / "nul.parquet", rows(2) + [{"id": "nul", "title": "a\x00b", "content": "c\x00\x00d"}]))]


def _mixed_types(d: Path) -> list[str]:
    # An integer id casts losslessly to "17"; a float id and a numeric title do not.
    lines = [json.dumps(r) for r in rows(2)] + [json.dumps({"id": 17, **GOOD}), json.dumps({"id": "m", "title": 5,
                                                                                         "content": "x"}),
                                             json.dumps({"id": 2.5, **GOOD})]
    return [str(jsonl(d / "mixed.jsonl", lines))]


def _null_ids(d: Path) -> list[str]:
    return [str(parquet(d / "ids.parquet", rows(2) + [{"id": None, **GOOD}, {"id": "  ", **GOOD}]))]


def _duplicate_ids(d: Path) -> list[str]:
    return [str(parquet(d / "dup.parquet", rows(3) + rows(2)))]


def _empty_strings(d: Path) -> list[str]:
    return [str(parquet(d / "e.parquet", rows(2) + [{"id": "e", "title": "", "content": ""}]))]


def _whitespace(d: Path) -> list[str]:
    return [str(parquet(d / "w.parquet", rows(2) + [{"id": "w", "title": " \t", "content": "\n\n  "}]))]


def _non_english(d: Path) -> list[str]:
    return [str(parquet(d / "i18n.parquet", [
        {"id": "zh", "title": "美联储维持利率不变", "content": "信用利差扩大，市场担忧经济衰退。"},
        {"id": "ar", "title": "البنك المركزي", "content": "ارتفاع أسعار الفائدة يضغط على الأسواق"},
        {"id": "emoji", "title": "📉 Markets", "content": "Stocks fell 🚨 as yields rose"}]))]


def _html(d: Path) -> list[str]:
    return [str(parquet(d / "html.parquet", [{"id": "h", "title": "<b>Fed</b> &amp; banks",
                                              "content": "<script>alert(1)</script><p>Credit <i>spreads</i> widen</p>"}]))]


def _zero_rows(d: Path) -> list[str]:
    parquet(d / "zero.parquet", [], schema=pa.schema([("id", pa.string()), ("title", pa.string()),
                                                      ("content", pa.string())]))
    parquet(d / "ok.parquet", rows(2))
    return [str(d)]


def _zero_rows_without_columns(d: Path) -> list[str]:
    # No row group is any shard's unit: the file's columns were checked by no one, and it scored as "0 rows".
    parquet(d / "zero.parquet", [], schema=pa.schema([("id", pa.string()), ("headline", pa.string())]))
    parquet(d / "ok.parquet", rows(2))
    return [str(d)]


def _parquet_named_jsonl(d: Path) -> list[str]:
    # Read as lines, a Parquet file was a column of "invalid UTF-8" rejects and a shard that succeeded.
    parquet(d / "ok.parquet", rows(2))
    (d / "night.jsonl").write_bytes((d / "ok.parquet").read_bytes())
    return [str(d / "night.jsonl")]


def _one_truncated_line(d: Path) -> list[str]:
    # One bad object is its row's reject however few rows its file has (not "not JSON Lines", exit 2)
    jsonl(d / "a.jsonl", [json.dumps(r) for r in rows(2)])
    (d / "b.jsonl").write_text('{"id": "t1", "title": "cut off", "cont\n')
    return [str(d)]


def _csv_named_jsonl(d: Path) -> list[str]:
    (d / "export.jsonl").write_text("id,title,content\n1,Rates rise,Central bank lifts rates\n")
    return [str(d / "export.jsonl")]


def _zero_bytes(d: Path) -> list[str]:
    (d / "empty.parquet").write_bytes(b"")
    return [str(d / "empty.parquet")]


def _zero_byte_jsonl(d: Path) -> list[str]:
    (d / "empty.jsonl").write_bytes(b"")
    parquet(d / "ok.parquet", rows(2))
    return [str(d)]


def _unreadable(d: Path) -> list[str]:
    path = parquet(d / "locked.parquet", rows(2))
    path.chmod(0)
    return [str(path)]


def _no_matching_files(d: Path) -> list[str]:
    (d / "notes.txt").write_text("not an input")
    return [str(d)]


def _glob_matches_nothing(d: Path) -> list[str]:
    return [str(d / "*.parquet")]


def _missing_path(d: Path) -> list[str]:
    return [str(d / "does-not-exist.parquet")]


def _csv(d: Path) -> list[str]:
    (d / "a.csv").write_text("id,title,content\n1,t,c\n")
    return [str(d / "a.csv")]


def _missing_content_column(d: Path) -> list[str]:
    return [str(parquet(d / "nc.parquet", [{"id": "a", "title": "only a title"}]))]


def _int_ids_parquet(d: Path) -> list[str]:
    return [str(parquet(d / "int.parquet", [{"id": i, **GOOD} for i in (0, 7, 2**40)]))]


def _float_ids_parquet(d: Path) -> list[str]:
    return [str(parquet(d / "float.parquet", [{"id": i + 0.5, **GOOD} for i in range(3)]))]


def _broken_jsonl_lines(d: Path) -> list[str]:
    lines = [json.dumps(r) for r in rows(2)] + ['{"id": "x", "title": ', "[1, 2, 3]", "", '"just a string"']
    return [str(jsonl(d / "broken.jsonl", lines))]


def _bad_utf8_parquet(d: Path) -> list[str]:
    # A writer that stored bytes as a string column: Parquet itself does not check them.
    content = pa.array([GOOD["content"].encode(), b"spreads \xff\xfe widen", GOOD["content"].encode()],
                       pa.binary()).view(pa.string())
    table = pa.table({"id": ["u0", "u1", "u2"], "title": [GOOD["title"]] * 3, "content": content})
    pq.write_table(table, d / "u.parquet")
    return [str(d / "u.parquet")]


def _missing_keys_in_jsonl(d: Path) -> list[str]:
    # One row without an id among good rows, and a file whose only row has none: the same reject either way.
    jsonl(d / "some.jsonl", [json.dumps(r) for r in rows(2)] + [json.dumps(GOOD)])
    jsonl(d / "only.jsonl", [json.dumps({"id": "x", "title": "no content key"})])
    return [str(d)]


def _optional_columns_of_any_kind(d: Path) -> list[str]:
    # NewsAPI-style: a source object, an epoch published_at; none of the stages reads them as text.
    jsonl(d / "o.jsonl", [json.dumps({**r, "source": {"id": "reuters", "name": "Reuters"}, "published_at": 1700000000})
                          for r in rows(2, "j")])
    pq.write_table(pa.table({"id": ["p0"], "title": [GOOD["title"]], "content": [GOOD["content"]],
                             "source": pa.array([{"id": "ft", "name": "FT"}])}), d / "o.parquet")
    return [str(d)]


def _json_array(d: Path) -> list[str]:
    (d / "a.json").write_text(json.dumps(rows(3), indent=2))
    return [str(d / "a.json")]


def _duplicate_columns(d: Path) -> list[str]:
    table = pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"]), pa.array(["t"]), pa.array(["c"])],
                                 names=["id", "id", "title", "content"])
    pq.write_table(table, d / "twice.parquet")
    return [str(d / "twice.parquet")]


def _kept_column_twice(d: Path) -> list[str]:
    table = pa.Table.from_arrays([pa.array(["a"]), pa.array(["t"]), pa.array(["c"]), pa.array(["x"]), pa.array([2])],
                                 names=["id", "title", "content", "extra", "extra"])
    pq.write_table(table, d / "kept.parquet")
    return [str(d / "kept.parquet")]


def _reasoning_of_any_kind(d: Path) -> list[str]:
    # Scoring never reads the oracle's reasoning: its type is no reason to reject an article, in JSONL or Parquet.
    jsonl(d / "r.jsonl", [json.dumps({**r, "reasoning": value}) for r, value in zip(rows(2, "j"), (5, {"x": 1}))])
    pq.write_table(pa.table({"id": ["p0"], "title": [GOOD["title"]], "content": [GOOD["content"]],
                             "reasoning": pa.array([{"x": 1}])}), d / "r.parquet")
    return [str(d)]


def _glob_characters_in_a_name(d: Path) -> list[str]:
    # A pattern that matches nothing names the file itself, as the shell passes it.
    parquet(d / "batch[1].parquet", rows(2))
    return [str(d / "batch[1].parquet")]


def _labels(value) -> Callable[[Path], list[str]]:
    def build(d: Path) -> list[str]:
        from investment_risk.core.spec import DIMENSIONS
        record = {**rows(1)[0], **{dim: 5.0 for dim in DIMENSIONS}}
        record["macro_risk_severity"] = value
        return [str(jsonl(d / "labels.jsonl", [json.dumps(record)]))]
    return build


def _wrong_type_model_input(d: Path) -> list[str]:
    return [str(parquet(d / "struct.parquet", [{"id": "s", "title": {"nested": "struct"}, "content": "c"}]))]


CASES = [
    Case("truncated parquet", _truncated, 2, "t.parquet"),
    Case("wrong magic bytes", _magic, 2, "m.parquet"),
    Case("schema drift between files", _schema_drift, 2, "b.parquet"),
    Case("list column for content", _nested, 2, "n.parquet"),
    Case("struct column for title", _wrong_type_model_input, 2, "struct.parquet"),
    Case("huge string", _huge, rows_in=3, rejects={"over the 1000000-byte limit": 1}),
    Case("invalid UTF-8 in JSONL", _bad_utf8, rows_in=3, rejects={"invalid UTF-8": 1}),
    Case("NUL bytes", _nul, rows_in=3),
    Case("a JSONL key given twice", _repeated_keys, rows_in=3, rejects={"invalid JSON": 1}),
    Case("mixed types in JSONL", _mixed_types, rows_in=5, rejects={"expected a string": 2}, scored_ids=("17",)),
    Case("null and blank ids", _null_ids, rows_in=4, rejects={"id is null or empty": 2}),
    Case("duplicate ids", _duplicate_ids, rows_in=5, rejects={"duplicate id": 2}),
    Case("empty strings", _empty_strings, rows_in=3, rejects={"both null or empty": 1}),
    Case("whitespace-only title and content", _whitespace, rows_in=3, rejects={"both null or empty": 1}),
    Case("non-English text", _non_english, rows_in=3),
    Case("HTML-laden content", _html, rows_in=1),
    Case("0-row Parquet file beside a good one", _zero_rows, rows_in=2),
    Case("0-row Parquet file without the article columns", _zero_rows_without_columns, 2,
         "zero.parquet: missing required column(s) title, content"),
    Case("a Parquet file named .jsonl", _parquet_named_jsonl, 2,
         "night.jsonl: not JSON Lines: no JSON object in its only line (line 1: invalid UTF-8"),
    Case("a JSONL file of one truncated line", _one_truncated_line, rows_in=3, rejects={"invalid JSON": 1}),
    Case("a CSV file named .jsonl", _csv_named_jsonl, 2, "export.jsonl: not JSON Lines: no JSON object in its 2 lines (line 1: invalid JSON"),
    Case("0-byte Parquet file", _zero_bytes, 2, "empty file (0 bytes)"),
    Case("0-byte JSONL file beside a good one", _zero_byte_jsonl, rows_in=2),
    Case("unreadable permissions", _unreadable, 2, "locked.parquet"),
    Case("directory with no matching files", _no_matching_files, 2, "holds no .parquet or .jsonl file"),
    Case("glob matching nothing", _glob_matches_nothing, 2, "*.parquet"),
    Case("missing path", _missing_path, 2, "does-not-exist.parquet"),
    Case("CSV file", _csv, 2, "a.csv"),
    Case("missing content column", _missing_content_column, 2, "content"),
    Case("integer ids in Parquet", _int_ids_parquet, rows_in=3, scored_ids=("0", "7", str(2**40))),
    Case("float ids in Parquet", _float_ids_parquet, 2, "float.parquet: column 'id' has type double"),
    Case("broken JSONL lines, a blank one too", _broken_jsonl_lines, rows_in=5, rejects={"": 3}, blank_lines=1),
    Case("invalid UTF-8 in Parquet", _bad_utf8_parquet, rows_in=3, rejects={"'content' is not valid UTF-8": 1}),
    Case("JSONL rows without a required key", _missing_keys_in_jsonl, rows_in=4,
         rejects={"no 'id' key": 1, "no 'content' key": 1}),
    Case("optional columns of any kind", _optional_columns_of_any_kind, rows_in=3, scored_ids=("j0", "j1", "p0")),
    Case("a JSON array in a .json file", _json_array, 2, "a.json: a JSON array, not JSON Lines"),
    Case("a column twice in Parquet", _duplicate_columns, 2, "twice.parquet: column(s) id appear more than once"),
    Case("a kept column twice in Parquet", _kept_column_twice, 2,
         "kept.parquet: column(s) extra appear more than once", options=("--keep-columns", "extra")),
    Case("reasoning of any kind", _reasoning_of_any_kind, rows_in=3, scored_ids=("j0", "j1", "p0")),
    Case("reasoning of any kind, kept", _reasoning_of_any_kind, rows_in=3, scored_ids=("j0", "j1", "p0"),
         options=("--keep-columns", "reasoning")),
    Case("a file name with glob characters", _glob_characters_in_a_name, rows_in=2, scored_ids=("r0", "r1")),
    Case("label out of range", _labels(12.5), 2, "outside [0, 10]", command="evaluate"),
    Case("label NaN", _labels(float("nan")), 2, "null or NaN", command="evaluate"),
    Case("label as a string", _labels("high"), 2, "macro_risk_severity", command="evaluate"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, exported, tmp_path, runner):
    if case.name == "unreadable permissions" and os.geteuid() == 0:
        pytest.skip("root reads any file: permissions cannot be denied to this process")
    _, model, _ = exported
    data = tmp_path / "in"
    data.mkdir()
    inputs = case.build(data)
    out = tmp_path / "out"
    if case.command == "evaluate":
        args = ["evaluate", "--model", str(model), "--data", inputs[0]]
    else:
        args = ["score", "--model", str(model), *[a for i in inputs for a in ("--input", i)], "--out", str(out),
                "--device", "cpu"]
    result = runner.invoke(main, [*args, *case.options])
    assert result.exit_code == case.exit_code, result.output
    if case.exit_code:
        error = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(error) == 1 and case.message in error[0], result.output
        assert not list(out.glob("part-*.parquet")) and not (out / "_done").exists()  # nothing half-made
        return
    parts = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))])
    rejects = pa.concat_tables([pq.read_table(p) for p in sorted((out / "rejects").glob("part-*.parquet"))])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows_in"] == case.rows_in == parts.num_rows + rejects.num_rows, result.output
    assert metrics["rows_rejected"] == rejects.num_rows and metrics["invariant_holds"]
    scored_ids = parts.column("id").to_pylist()
    assert len(scored_ids) == len(set(scored_ids)), "an id was scored twice"
    reasons = rejects.column("reason").to_pylist()
    assert all(reasons) and all(rejects.column("source_file").to_pylist())
    for fragment, count in case.rejects.items():
        assert sum(fragment in r for r in reasons) == count, reasons
    assert rejects.num_rows == sum(case.rejects.values()), reasons
    assert set(case.scored_ids) <= set(scored_ids), scored_ids
    assert metrics["blank_lines"] == case.blank_lines


def test_corpus_is_broad():
    assert len(CASES) >= 25 and len({c.name for c in CASES}) == len(CASES)


def test_a_bad_optional_label_in_jsonl_leaves_the_good_ones_of_its_batch_usable(tmp_path):
    from investment_risk.core.spec import DIMENSIONS, default_spec
    from investment_risk.datasets.readers import iter_file_batches
    from investment_risk.scoring.pipeline import usable_labels

    labelled = [{**r, **{d: 5.0 for d in DIMENSIONS}} for r in rows(5)]
    labelled[2]["macro_risk_severity"] = "high"
    labelled[3]["macro_risk_severity"] = 12  # a number out of range: unusable too
    [batch] = iter_file_batches(jsonl(tmp_path / "l.jsonl", [json.dumps(r) for r in labelled]), lenient=True)
    labels, unusable = usable_labels(batch.table, default_spec())
    assert unusable.tolist() == [0, 0, 1, 1, 0] and labels[[0, 1, 4], 0].tolist() == [5.0, 5.0, 5.0]
    # Every value a string (even one that reads as a number, as in Parquet), or a boolean among numbers: unusable
    for values in (["high", "5", "7", "x", "y"], [5.5, True, 3, 4, 5]):
        for record, value in zip(labelled, values):
            record["macro_risk_severity"] = value
        [batch] = iter_file_batches(jsonl(tmp_path / "l.jsonl", [json.dumps(r) for r in labelled]), lenient=True)
        unusable = usable_labels(batch.table, default_spec())[1]
        assert unusable.tolist() == [1] * 5 if isinstance(values[0], str) else [0, 1, 0, 0, 0], values


def test_an_integer_label_past_a_floats_range_is_unusable_not_the_batchs_end(tmp_path):
    from investment_risk.core.spec import DIMENSIONS, default_spec
    from investment_risk.datasets.readers import iter_file_batches
    from investment_risk.scoring.pipeline import usable_labels

    labelled = [{**r, **{d: 5 for d in DIMENSIONS}} for r in rows(3)]
    labelled[1]["macro_risk_severity"], labelled[2]["credit_market_stress"] = 10**400, -10**400
    [batch] = iter_file_batches(jsonl(tmp_path / "l.jsonl", [json.dumps(r) for r in labelled]), lenient=True)
    labels, unusable = usable_labels(batch.table, default_spec())
    assert unusable.tolist() == [0, 1, 1] and labels[0, 0] == 5.0


def test_a_kept_jsonl_reasoning_reads_the_same_whatever_its_batch_holds(tmp_path):
    from investment_risk.datasets.readers import iter_file_batches
    from investment_risk.scoring.units import READ_COLUMNS
    from investment_risk.scoring.writer import kept_columns

    path = jsonl(tmp_path / "r.jsonl", [json.dumps({**r, "reasoning": v}) for r, v in zip(rows(2), ("plain", {"k": 1}))])
    [batch] = iter_file_batches(path, columns=[*READ_COLUMNS, "reasoning"], lenient=True)
    assert not batch.problems  # scoring reads no reasoning: an object there rejects no article
    assert kept_columns(batch, [0, 1], ["reasoning"])["reasoning"].to_pylist() == ["plain", '{"k": 1}']
    [batch] = iter_file_batches(path, lenient=True)  # a reader of labelled data: reasoning is its text
    assert list(batch.problems) == [1] and "'reasoning' is an object, expected a string" in batch.problems[1]


def test_a_kept_jsonl_value_reads_the_same_whatever_its_batch_holds(tmp_path):
    """A kept column was typed over the read batch: an object gained its neighbours' keys as nulls, and a string
    beside an object became JSON text; a join on the kept column then missed."""
    from investment_risk.datasets.readers import iter_file_batches
    from investment_risk.scoring.units import READ_COLUMNS
    from investment_risk.scoring.writer import kept_columns

    def kept(values: list) -> list:
        path = jsonl(tmp_path / "m.jsonl", [json.dumps({**r, "meta": v}) for r, v in zip(rows(len(values)), values)])
        [batch] = iter_file_batches(path, columns=[*READ_COLUMNS, "meta"], lenient=True)
        return kept_columns(batch, list(range(len(values))), ["meta"])["meta"].to_pylist()

    alone = [kept([v])[0] for v in ({"tags": ["a"]}, "str", 5, None)]
    assert alone == ['{"tags": ["a"]}', "str", "5", None]
    assert kept([{"tags": ["a"]}, {"author": "x"}, "str", 5, None]) == [alone[0], '{"author": "x"}', *alone[1:]]


def test_a_kept_binary_value_reads_the_same_whatever_its_batch_holds():
    from investment_risk.datasets.readers import Batch
    from investment_risk.scoring.writer import kept_columns

    def kept(values: list) -> list:
        batch = Batch(Path("b.parquet"), 0, pa.table({"blob": pa.array(values, type=pa.binary())}), {})
        return kept_columns(batch, list(range(len(values))), ["blob"])["blob"].to_pylist()

    assert kept([b"ok", None]) == ["ok", None]
    assert kept([b"\xff\x00", b"ok", None]) == ["\\xff\x00", "ok", None]  # invalid UTF-8 escaped, the rest as cast


def test_a_jsonl_line_that_opens_with_a_bracket_is_that_rows_reject_and_an_unread_doubled_column_is_fine(tmp_path):
    from investment_risk.datasets.readers import iter_file_batches

    path = jsonl(tmp_path / "log.jsonl", ["[2026-12-01] not an article", json.dumps(rows(1)[0]), '{"id": "cut", "ti'])
    [batch] = iter_file_batches(path, lenient=True)
    assert list(batch.problems) == [0, 2] and "invalid JSON" in batch.problems[0]
    assert batch.problems[2] == "invalid JSON (Unterminated string starting at column 15)"  # in its line, not the next
    table = pa.Table.from_arrays([pa.array(["a"]), pa.array(["t"]), pa.array(["c"]), pa.array([1]), pa.array([2])],
                                 names=["id", "title", "content", "extra", "extra"])
    pq.write_table(table, tmp_path / "extra.parquet")
    [batch] = iter_file_batches(tmp_path / "extra.parquet", columns=["id", "title", "content"])
    assert batch.table.num_rows == 1 and not batch.problems
    # kept, it is read: the batch's listing refuses the file, before any shard wrote a row
    from investment_risk.core.errors import InputError
    from investment_risk.scoring.units import READ_COLUMNS, list_units

    assert len(list_units([tmp_path / "extra.parquet"])) == 1
    with pytest.raises(InputError, match="extra.parquet: column.s. extra appear more than once"):
        list_units([tmp_path / "extra.parquet"], read=(*READ_COLUMNS, "extra"))


def test_a_malformed_model_json_is_one_line_naming_it(exported, tmp_path, runner):
    import shutil

    _, model, _ = exported
    for edit, message in ((lambda info: info.pop("max_length"), "no 'max_length' field"),
                          (lambda info: info.update(truncation="middle"), "truncation 'middle' is not one of"),
                          # not hashed, so a hand edit: scored under another version's name, or a traceback
                          (lambda info: info.update(model_version="deadbeefdeadbeef"), "is not the one its files'"),
                          (lambda info: info.update(max_length=0), "max_length 0 is not a token count"),
                          (lambda info: info.update(pad_token_id="x"), "pad_token_id 'x' is not a token id"),
                          (lambda info: info["cpu_engine"].update(measured_on="x"), "cpu_engine is not what")):
        broken = tmp_path / "model"
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(model, broken)
        info = json.loads((broken / "model.json").read_text())
        edit(info)
        (broken / "model.json").write_text(json.dumps(info))
        parquet(tmp_path / "in.parquet", rows(2))
        result = runner.invoke(main, ["score", "--model", str(broken), "--input", str(tmp_path / "in.parquet"),
                                      "--out", str(tmp_path / "out")])
        assert result.exit_code == 2 and "model.json" in result.output and message in result.output, result.output
        assert "Traceback" not in result.output


def test_an_empty_path_or_a_name_that_is_not_utf8_is_one_line_with_exit_2(exported, tmp_path, runner, monkeypatch):
    # '' is the current directory to pathlib: it scored all of it. A non-UTF-8 name made Arrow raise a traceback.
    _, model, _ = exported
    folder = tmp_path / "in"
    folder.mkdir()
    parquet(folder / "ok.parquet", rows(2))
    monkeypatch.chdir(folder)
    result = runner.invoke(main, ["score", "--model", str(model), "--input", "", "--out", str(tmp_path / "o1")])
    assert result.exit_code == 2 and "an empty path" in result.output, result.output
    (folder / os.fsdecode(b"n\xffm.parquet")).write_bytes((folder / "ok.parquet").read_bytes())
    result = runner.invoke(main, ["score", "--model", str(model), "--input", str(folder), "--out", str(tmp_path / "o2")])
    assert result.exit_code == 2 and "not valid UTF-8" in result.output and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_library_error_of_several_lines_is_one_and_a_read_only_place_is_exit_2(tmp_path, runner, monkeypatch):
    import errno

    from investment_risk.datasets import synth as data_cli

    for code, text in ((errno.EROFS, "Read-only file system"), (errno.EFBIG, "File too large")):
        def fails(*args, code=code, text=text, **kwargs):
            raise OSError(code, text, str(tmp_path / "ro" / "s.parquet"))

        monkeypatch.setattr(data_cli, "write_synthetic", fails)
        result = runner.invoke(main, ["data", "synth", "--rows", "5", "--out", str(tmp_path / "ro" / "s.parquet")])
        assert result.exit_code == 2 and text in result.output, result.output  # no retry helps

    from investment_risk.core.errors import InputError

    def multi(*args, **kwargs):
        raise InputError("x.parquet: corrupt Parquet data (Couldn't deserialize thrift\nDeserializing page header failed.\n)")

    monkeypatch.setattr(data_cli, "write_synthetic", multi)
    result = runner.invoke(main, ["data", "synth", "--rows", "5", "--out", str(tmp_path / "s.parquet")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "thrift Deserializing page header failed. )" in result.output
