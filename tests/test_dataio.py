import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from investment_risk.core.atomic import atomic_path, write_json_atomic, write_parquet_atomic
from investment_risk.datasets.readers import expand_inputs, iter_file_batches, read_articles
from investment_risk.core.errors import InputError
from investment_risk.core.spec import DIMENSIONS

from .conftest import article_rows


def write_parquet(path: Path, rows: list[dict], **kw) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path, **kw)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_expand_files_directories_and_globs(tmp_path):
    write_parquet(tmp_path / "b.parquet", article_rows(2))
    write_parquet(tmp_path / "a.parquet", article_rows(2))
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "c.jsonl", article_rows(1))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "_done").mkdir()
    write_parquet(tmp_path / "_done" / "hidden.parquet", article_rows(1))
    assert [p.name for p in expand_inputs([tmp_path])] == ["a.parquet", "b.parquet", "c.jsonl"]
    assert [p.name for p in expand_inputs([str(tmp_path / "*.parquet")])] == ["a.parquet", "b.parquet"]
    both = expand_inputs([tmp_path / "a.parquet", str(tmp_path / "*.parquet")])
    assert [p.name for p in both] == ["a.parquet", "b.parquet"]


def test_a_subdirectory_that_cannot_be_listed_is_an_error_not_a_skip(tmp_path, monkeypatch):
    write_parquet(tmp_path / "a.parquet", article_rows(2))
    (tmp_path / "sub").mkdir()
    write_parquet(tmp_path / "sub" / "b.parquet", article_rows(2))
    (tmp_path / "loop").symlink_to(tmp_path)  # a symlink loop is walked once
    assert [p.name for p in expand_inputs([tmp_path])] == ["a.parquet", "b.parquet"]
    scandir = os.scandir

    def denied(path):  # what a root-owned 0700 folder gives a pod's user (root itself reads anything)
        if str(path).endswith("sub"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(InputError, match=f"{tmp_path / 'sub'}: cannot list this directory"):
        expand_inputs([tmp_path])


def test_a_glob_folder_that_cannot_be_listed_is_an_error_not_a_skip(tmp_path, monkeypatch):
    write_parquet(tmp_path / "a.parquet", article_rows(2))
    (tmp_path / "sub").mkdir()
    write_parquet(tmp_path / "sub" / "b.parquet", article_rows(2))
    (tmp_path / "sub" / "loop").symlink_to(tmp_path)  # glob.glob would list every file again at each depth
    assert [p.name for p in expand_inputs([str(tmp_path / "**" / "*.parquet")])] == ["a.parquet", "b.parquet"]
    scandir = os.scandir

    def denied(path):
        if str(path).endswith("sub"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", denied)
    for pattern in ("**/*.parquet", "*/*.parquet"):
        with pytest.raises(InputError, match=f"{tmp_path / 'sub'}: cannot list this directory"):
            expand_inputs([str(tmp_path / pattern)])
    assert [p.name for p in expand_inputs([str(tmp_path / "*.parquet")])] == ["a.parquet"]  # sub is not needed
    lstat = os.lstat

    def unsearchable(path, *args, **kwargs):  # a folder with no search (x) permission: its entries cannot be looked up
        if os.path.dirname(str(path)).endswith("sub"):
            raise PermissionError(13, "Permission denied", str(path))
        return lstat(path, *args, **kwargs)
    monkeypatch.setattr(os, "lstat", unsearchable)
    with pytest.raises(InputError, match=f"{tmp_path / 'sub'}: cannot search this directory"):
        expand_inputs([str(tmp_path / "*" / "b.parquet")])  # the wildcard in a middle folder


def test_a_glob_ending_in_a_slash_matches_folders_not_files(tmp_path):
    (tmp_path / "sub").mkdir()
    write_parquet(tmp_path / "sub" / "b.parquet", article_rows(2))
    with pytest.raises(InputError, match="no Parquet or JSONL file matches"):
        expand_inputs([str(tmp_path / "*") + "/"])


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.parquet", "no such file or directory"),
    (lambda d: str(d / "*.parquet"), "no Parquet or JSONL file matches"),
    (lambda d: d, "directory holds no"),
    (lambda d: (d / "x.csv").write_text("a") and d / "x.csv", "unsupported file type"),
])
def test_expand_errors_name_the_input(tmp_path, make, message):
    target = make(tmp_path)
    with pytest.raises(InputError, match=message) as info:
        expand_inputs([target])
    assert str(target) in str(info.value)


def test_parquet_is_streamed_in_bounded_batches(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", article_rows(2500), row_group_size=1000)
    batches = list(iter_file_batches(path, batch_rows=300))
    assert all(b.table.num_rows <= 300 for b in batches)
    assert sum(b.table.num_rows for b in batches) == 2500
    assert [b.start_row for b in batches][:3] == [0, 300, 600]


def test_jsonl_is_streamed_in_bounded_batches(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", article_rows(250))
    batches = list(iter_file_batches(path, batch_rows=100, labels=DIMENSIONS))
    assert [b.table.num_rows for b in batches] == [100, 100, 50]
    assert batches[0].table.schema.field("macro_risk_severity").type == pa.float64()


def bad_cases(tmp: Path):
    rows = article_rows(5)
    yield "missing column", write_parquet(tmp / "m.parquet", [{k: v for k, v in r.items() if k != "content"} for r in rows]), \
        "missing required column(s) content"
    yield "missing label", write_parquet(tmp / "ml.parquet", [{k: v for k, v in r.items() if k != "actionability"} for r in rows]), \
        "missing required column(s) actionability"
    yield "wrong type", write_parquet(tmp / "t.parquet", [{**r, "title": 5} for r in rows]), "column 'title' has type int64"
    yield "label as string", write_parquet(tmp / "ls.parquet", [{**r, "valuation_risk": "7"} for r in rows]), \
        "label column 'valuation_risk' has type string"
    (tmp / "empty.parquet").write_bytes(b"")
    yield "empty file", tmp / "empty.parquet", "empty file (0 bytes)"
    (tmp / "zero.jsonl").write_text("")
    yield "zero rows", tmp / "zero.jsonl", "no rows"
    pq.write_table(pa.Table.from_pylist(rows).slice(0, 0), tmp / "zero.parquet")
    yield "zero-row parquet", tmp / "zero.parquet", "no rows"
    (tmp / "corrupt.parquet").write_bytes(b"PAR1" + os.urandom(200) + b"PAR1")
    yield "corrupt parquet", tmp / "corrupt.parquet", "not a readable Parquet file"
    good = write_parquet(tmp / "good.parquet", rows)
    (tmp / "trunc.parquet").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    yield "truncated parquet", tmp / "trunc.parquet", "not a readable Parquet file"
    yield "invalid json", write_jsonl(tmp / "bad.jsonl", [rows[0], "{not json", rows[2]]), "line 2: invalid JSON"
    yield "json not an object", write_jsonl(tmp / "arr.jsonl", [rows[0], "[1, 2]"]), "line 2: expected a JSON object"
    (tmp / "utf.jsonl").write_bytes(json.dumps(rows[0]).encode() + b"\n" + b'{"id": "\xff\xfe"}\n')
    yield "invalid utf-8", tmp / "utf.jsonl", "line 2: invalid UTF-8"
    yield "label out of range", write_parquet(tmp / "r.parquet", rows[:3] + [{**rows[3], "systemic_risk": 10.5}]), \
        "row 3: label 'systemic_risk' = 10.5 is outside [0, 10]"
    yield "label NaN", write_parquet(tmp / "n.parquet", [{**rows[0], "evidence_quality": float("nan")}] + rows[1:]), \
        "row 0: label 'evidence_quality' is null or NaN"
    yield "label string in jsonl", write_jsonl(tmp / "s.jsonl", rows[:1] + [{**rows[1], "actionability": "high"}]), \
        "line 2: column 'actionability' is a string, expected a number"
    yield "mixed types in jsonl", write_jsonl(tmp / "mx.jsonl", rows[:2] + [{**rows[2], "content": 12}]), \
        "line 3: column 'content' is a number, expected a string"
    yield "null id", write_parquet(tmp / "ni.parquet", rows[:1] + [{**rows[1], "id": None}]), "row 1: id is null or empty"
    yield "empty text", write_jsonl(tmp / "et.jsonl", [{**rows[0], "title": " ", "content": ""}]), \
        "line 1: title and content are both null or empty"


@pytest.mark.parametrize("case", range(18))
def test_bad_input_is_a_one_line_error_naming_file_and_row(tmp_path, case):
    name, path, message = list(bad_cases(tmp_path))[case]
    with pytest.raises(InputError) as info:
        read_articles([path], labels=DIMENSIONS)
    text = str(info.value)
    assert message in text, name
    assert str(path) in text and "\n" not in text


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_unreadable_file_is_named(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"locked{suffix}"
    write_parquet(path, article_rows(2)) if suffix == ".parquet" else write_jsonl(path, article_rows(2))
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: make the open fail as it would for anyone else
        def deny(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(path))
        monkeypatch.setattr(pq, "read_metadata", deny)
        monkeypatch.setattr(Path, "open", deny)
    with pytest.raises(InputError, match=f"{path}: permission denied"):
        read_articles([path])


def test_read_articles_concatenates_and_normalises_types(tmp_path):
    a = write_parquet(tmp_path / "a.parquet", article_rows(3))
    b = write_jsonl(tmp_path / "b.jsonl", article_rows(2, start=3))
    table = read_articles([a, b], labels=DIMENSIONS)
    assert table.num_rows == 5
    assert table.schema.field("macro_risk_severity").type == pa.float32()
    assert table.column("id").to_pylist() == ["a0", "a1", "a2", "a3", "a4"]


def test_atomic_writer_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "out" / "x.parquet"
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    write_parquet_atomic(pa.table({"a": [1]}), dest)
    assert pq.read_table(dest).num_rows == 1 and len(list(dest.parent.iterdir())) == 1
    write_json_atomic({"k": 1}, tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == {"k": 1}
    assert oct((tmp_path / "m.json").stat().st_mode & 0o777) != oct(0o600)


def test_atomic_writers_set_modes_and_sync_the_directory(tmp_path, monkeypatch):
    """A rename is durable only once its directory is synced: every writer does it after its rename."""
    from investment_risk.core import atomic

    synced: list[Path] = []
    real, real_fsync = atomic.fsync_dir, os.fsync
    monkeypatch.setattr(atomic, "fsync_dir", lambda path: (synced.append(Path(path)), real(path)))
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(Path(os.readlink(f"/proc/self/fd/{fd}"))),
                                                         real_fsync(fd)))
    write_json_atomic({"k": 1}, tmp_path / "f" / "m.json")
    synced[:] = dict.fromkeys(synced)  # fsync_dir's own os.fsync is recorded twice
    assert synced[-1] == tmp_path / "f" and synced[0].name.startswith(".m.json.")  # the file, then its rename
    synced.clear()
    atomic.write_dir_atomic(tmp_path / "d" / "model", lambda work: (work / "a.txt").write_text("a"))
    # A directory's files reach the disk before the rename names them (a checkpoint latest.json points at)
    synced[:] = dict.fromkeys(synced)
    work = synced[0].parent
    assert synced == [work / "a.txt", work, tmp_path / "d"] and work.name.startswith(".model.partial-")
    assert (tmp_path / "f" / "m.json").stat().st_mode & 0o777 == atomic.FILE_MODE
    assert (tmp_path / "d" / "model").stat().st_mode & 0o777 == atomic.DIR_MODE


def test_a_directory_is_replaced_in_one_step_where_the_kernel_can(tmp_path, monkeypatch):
    # Two renames left /models/current missing between them (and for good, if killed there): a scorer starting
    # then failed with exit 2. renameat2's exchange swaps the two directories at once.
    from investment_risk.core import atomic

    dest = tmp_path / "current"
    atomic.write_dir_atomic(dest, lambda work: (work / "model.json").write_text("old"))
    monkeypatch.setattr(Path, "rename", lambda *a: pytest.fail("swapped by hand where the kernel swaps"))
    atomic.write_dir_atomic(dest, lambda work: (work / "model.json").write_text("new"))
    assert (dest / "model.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["current"]
    monkeypatch.undo()
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)  # NFS: no exchange, the swap by hand still works
    atomic.write_dir_atomic(dest, lambda work: (work / "model.json").write_text("newer"))
    assert (dest / "model.json").read_text() == "newer" and sorted(p.name for p in tmp_path.iterdir()) == ["current"]


def test_a_directory_half_built_by_a_killed_attempt_is_removed_by_the_next_write(tmp_path):
    from investment_risk.core import atomic

    def killed(work):
        (work / "model.onnx.data").write_bytes(b"\0" * 1024)
        raise KeyboardInterrupt

    dest = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt), pytest.MonkeyPatch.context() as patch:
        # SIGKILL runs no `finally`: the half-built directory stays
        patch.setattr(atomic.shutil, "rmtree", lambda *args, **kwargs: None)
        atomic.write_dir_atomic(dest, killed)
    other = tmp_path / ".model-fp16.partial-x"  # another destination's, whose name shares the prefix
    other.mkdir()
    assert [p.name.split("-")[0] for p in tmp_path.glob(".model.partial-*")] == [".model.partial"]
    atomic.write_dir_atomic(dest, lambda work: (work / "model.onnx").write_text("graph"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model-fp16.partial-x", "model"]


WRITER = """
import sys, time
from investment_risk.core.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("half")
    print(tmp, flush=True)
    sys.stdin.read()  # until the test lets it finish (or kills it)
    tmp.write_text(sys.argv[2])
"""


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write_and_a_live_ones_is_not(tmp_path):
    """SIGKILL runs no `finally`; a live writer (a raced shard, another merge of metrics.json) holds its lock."""
    import signal
    import subprocess
    import sys

    dest = tmp_path / "metrics.json"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(dest), name], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True) for name in ("killed", "live")]
    killed_tmp, live_tmp = (Path(w.stdout.readline().strip()) for w in writers)
    writers[0].send_signal(signal.SIGKILL)
    writers[0].wait()
    assert killed_tmp.exists() and live_tmp.exists()
    write_json_atomic({"k": 1}, dest)
    assert not killed_tmp.exists() and live_tmp.exists()
    writers[1].communicate("")  # the live writer finishes: its rename still succeeds
    assert writers[1].returncode == 0 and dest.read_text() == "live"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_another_kernels_temporary_file_is_removed_only_once_no_job_could_still_be_writing_it(tmp_path):
    """On a shared volume whose locks stay on each node, a free lock on another node's file proves nothing."""
    import time

    from investment_risk.core import atomic

    dest = tmp_path / "metrics.json"
    foreign, old = tmp_path / ".metrics.json.0123456789ab-x1.tmp", tmp_path / ".metrics.json.0123456789ab-x2.tmp"
    legacy = tmp_path / ".metrics.json.abcd1234.tmp"  # named before temporary files carried their kernel
    for path in (foreign, old, legacy):
        path.write_text("half")
    for path in (old, legacy):
        past = time.time() - atomic.FOREIGN_AGE_S - 60
        os.utime(path, (past, past))
    write_json_atomic({"k": 1}, dest)
    assert foreign.exists() and not old.exists() and not legacy.exists()


def test_jsonl_blank_lines_are_skipped_counted_and_rows_keep_their_line_numbers(tmp_path):
    path = tmp_path / "b.jsonl"
    records = [json.dumps(r) for r in article_rows(3, labels=False)]
    path.write_text(records[0] + "\n\n   \n" + records[1] + "\n{broken\n" + records[2] + "\n\t\n")
    [batch] = list(iter_file_batches(path, lenient=True))
    assert batch.table.num_rows == 4 and batch.blank_lines == 3
    assert [batch.row_number(i) for i in range(4)] == [0, 3, 4, 5]  # 0-based line index
    assert batch.where(2) == f"{path} line 5" and "invalid JSON" in batch.problems[2]
    with pytest.raises(InputError, match="line 5: invalid JSON"):  # strict reading names the same line
        list(iter_file_batches(path))


def test_integer_ids_are_read_as_decimal_strings(tmp_path):
    write_parquet(tmp_path / "i.parquet", [{**r, "id": n} for n, r in enumerate(article_rows(3), start=41)])
    table = read_articles([tmp_path / "i.parquet"], labels=DIMENSIONS)
    assert table.column("id").to_pylist() == ["41", "42", "43"] and table.schema.field("id").type == pa.string()
    write_parquet(tmp_path / "f.parquet", [{**r, "id": 1.5} for r in article_rows(3)])
    with pytest.raises(InputError, match="column 'id' has type double, expected string or integer"):
        read_articles([tmp_path / "f.parquet"], labels=DIMENSIONS)


def test_text_stored_otherwise_is_read_as_text(tmp_path):
    """A pandas category (dictionary-encoded) title, a timestamp published_at and a BOM before the first JSONL line
    are ordinary inputs; so is a source with no text form, kept as it is (no stage reads it as text), where a
    reasoning (instruction training's target text) with none is refused naming it."""
    table = pa.Table.from_pylist(article_rows(3))
    table = table.set_column(table.schema.get_field_index("title"), "title", table.column("title").dictionary_encode())
    table = table.append_column("published_at", pa.array([1, 2, 3], pa.timestamp("s", tz="UTC")))
    pq.write_table(table, tmp_path / "cat.parquet")
    read = read_articles([tmp_path / "cat.parquet"], labels=DIMENSIONS)
    assert read.schema.field("title").type == pa.string() and read.column("title").to_pylist()[0] == "Title 0"
    assert read.column("published_at").to_pylist()[0].startswith("1970-01-01T00:00:01")  # ISO 8601, as JSON has it
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in article_rows(2)).encode())
    assert read_articles([bom], labels=DIMENSIONS).column("id").to_pylist() == ["a0", "a1"]
    for column in ("source", "reasoning"):
        pq.write_table(pa.Table.from_pylist(article_rows(2)).append_column(column, pa.array([{"a": 1}, {"a": 2}])),
                       tmp_path / f"{column}.parquet")
    kept = read_articles([tmp_path / "source.parquet"], labels=DIMENSIONS)
    assert kept.column("source").to_pylist() == [{"a": 1}, {"a": 2}]
    with pytest.raises(InputError, match="reasoning.parquet: column 'reasoning' has type struct<a: int64>, which has"):
        read_articles([tmp_path / "reasoning.parquet"], labels=DIMENSIONS)


def test_a_read_the_storage_failed_is_retryable_and_a_corrupt_file_is_not(tmp_path, monkeypatch):
    import errno

    from investment_risk.core.errors import RetryableError
    from investment_risk.datasets import readers

    pq.write_table(pa.Table.from_pylist(article_rows(2)), tmp_path / "ok.parquet")
    (tmp_path / "ok.jsonl").write_text("".join(json.dumps(r) + "\n" for r in article_rows(2)))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1" + b"not a footer" + b"PAR1")
    with pytest.raises(InputError, match="bad.parquet: not a readable Parquet file"):
        read_articles([tmp_path / "bad.parquet"])

    def eio(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(readers.pq, "ParquetFile", eio)  # an NFS volume that hiccups mid-night
    with pytest.raises(RetryableError, match="ok.parquet: I/O error while reading"):
        read_articles([tmp_path / "ok.parquet"])
    monkeypatch.setattr(Path, "open", eio)
    with pytest.raises(RetryableError, match="ok.jsonl: I/O error while reading"):
        read_articles([tmp_path / "ok.jsonl"])


def test_a_broken_link_or_a_pipe_among_the_inputs_is_named_not_skipped(tmp_path):
    from investment_risk.datasets.synth import SynthConfig, generate

    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(generate(SynthConfig(rows=3, seed=1)), folder / "ok.parquet")
    (folder / "gone.parquet").symlink_to(tmp_path / "nowhere.parquet")
    for spec in (str(folder), str(folder / "*.parquet"), str(folder / "gone.parquet")):
        with pytest.raises(InputError, match="gone.parquet: a broken symbolic link"):
            expand_inputs([spec])
    (folder / "gone.parquet").unlink()
    os.mkfifo(folder / "pipe.jsonl")
    for spec in (str(folder), str(folder / "pipe.jsonl")):
        with pytest.raises(InputError, match="pipe.jsonl: not a regular file"):
            expand_inputs([spec])


def test_evaluation_data_with_an_id_twice_is_named(tmp_path):
    from investment_risk.datasets.synth import SynthConfig, generate

    table = generate(SynthConfig(rows=6, seed=1))
    ids = table.column("id").to_pylist()
    table = table.set_column(table.column_names.index("id"), "id", pa.array([*ids[:5], ids[2]]))
    pq.write_table(table, tmp_path / "labelled.parquet")
    assert read_articles([tmp_path / "labelled.parquet"]).num_rows == 6  # split reads them all, then de-duplicates
    with pytest.raises(InputError, match=rf"labelled.parquet row 5: id '{ids[2]}' again \(first at .*row 2\)"):
        read_articles([tmp_path / "labelled.parquet"], unique_ids=True)


def test_a_folder_or_glob_refuses_compressed_articles_and_names_what_it_skips(tmp_path):
    import gzip

    from structlog.testing import capture_logs

    rows = "".join(json.dumps(r) + "\n" for r in article_rows(3, labels=False))
    (tmp_path / "a.jsonl").write_text(rows)
    (tmp_path / "notes.csv").write_text("x\n")
    (tmp_path / "split_summary.json").write_text("{}")  # a folder's .json is metadata: skipped without a word
    with capture_logs() as logs:
        assert expand_inputs([str(tmp_path)]) == [tmp_path / "a.jsonl"]
    [skipped] = [e for e in logs if e["event"] == "inputs_skipped"]
    assert skipped["files"] == [str(tmp_path / "notes.csv")] and skipped["log_level"] == "warning"
    # JSON lines of articles named .json are still metadata by name, but their rows are not dropped without a word
    (tmp_path / "more.json").write_text(rows)
    with capture_logs() as logs:
        assert expand_inputs([str(tmp_path)]) == [tmp_path / "a.jsonl"]
    assert [e["files"] for e in logs if "rename them .jsonl" in e.get("reason", "")] == [[str(tmp_path / "more.json")]]
    assert expand_inputs([str(tmp_path / "more.json")]) == [tmp_path / "more.json"]  # named, it is read
    (tmp_path / "more.json").unlink()
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as handle:  # its rows would be lost without a word
        handle.write(rows)
    for given in (str(tmp_path), str(tmp_path / "*")):
        with pytest.raises(InputError, match="b.jsonl.gz: a compressed article file is not read"):
            expand_inputs([given])


def test_data_given_twice_is_refused_and_split_reads_every_input(tmp_path):
    from click.testing import CliRunner

    from investment_risk.cli import main

    for name, start in (("a", 0), ("b", 40)):
        pq.write_table(pa.Table.from_pylist(article_rows(40, start=start)), tmp_path / f"{name}.parquet")
    result = CliRunner().invoke(main, ["evaluate", "--model", str(tmp_path), "--data", str(tmp_path / "a.parquet"),
                                       "--data", str(tmp_path / "b.parquet")])
    assert result.exit_code == 2 and "--data was given more than once" in result.output, result.output
    # `data split --input` repeats: every file's rows (Click kept the last and dropped the first's before)
    result = CliRunner().invoke(main, ["data", "split", "--input", str(tmp_path / "a.parquet"), "--input",
                                       str(tmp_path / "b.parquet"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "split_summary.json").read_text())["rows_in"] == 80


def test_invalid_utf8_in_any_text_column_read_is_a_row_problem(tmp_path):
    """A kept column is written on as it came: invalid UTF-8 there made a part file no reader could open."""
    table = pa.table({"id": ["a", "b"], "title": ["t", "t"], "content": ["c", "c"],
                      "meta": pa.array([b"fine", b"x\xffy"], pa.binary()).cast(pa.string(), safe=False)})
    pq.write_table(table, tmp_path / "m.parquet")
    [batch] = iter_file_batches(tmp_path / "m.parquet", lenient=True)
    assert batch.problems == {1: "column 'meta' is not valid UTF-8 (invalid start byte at byte 1)"}
    batch.table.validate(full=True)  # what is written on is valid
