"""`opt-ds preprocess`: lossless round trips, dedup, bad input, never-damaged output, and resume after a kill."""
import fcntl
import gzip
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from multiproc import REPO, child_env
from opt_ds.cli import main as opt_ds_main
from opt_ds.data.files import DatasetFiles
from opt_ds.data.megatron_quiet import import_quietly
from opt_ds.data.preprocess import PreprocessConfig, PreprocessError, preprocess
from opt_ds.data.sources import BUNDLED_CORPUS
from opt_ds.data.tokenizer import BPETokenizer
from opt_ds.data.workdir import PartialRunError

DOCS = ["Plain ASCII document.\nSecond line.", "Grüße aus Köln — naïve café, 東京, 🎭 \r\nCRLF kept\t tabs",
        "  leading and trailing spaces, literal </s> and <pad>  ", "Ωμέγα: ελληνικό κείμενο.\n\n\n"]


def stored_documents(prefix) -> list[list[int]]:
    indexed = import_quietly("megatron.core.datasets.indexed_dataset").IndexedDataset(str(prefix))
    return [indexed[i].tolist() for i in range(len(indexed))]


def decoded_documents(prefix) -> list[str]:
    tokenizer = BPETokenizer.load(DatasetFiles.of(prefix).tokenizer)
    documents = stored_documents(prefix)
    assert all(doc[-1] == tokenizer.eos_id and tokenizer.eos_id not in doc[:-1] for doc in documents)
    return [tokenizer.decode(doc[:-1]) for doc in documents]


def run_preprocess(inputs, prefix, **options) -> dict:
    options.setdefault("tokenizer", "opt")
    return preprocess(PreprocessConfig(inputs=[str(p) for p in inputs], output_prefix=str(prefix), **options),
                      progress=False)


def write_jsonl(path, records, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)) + "\n")
    return path


def test_txt_and_jsonl_round_trip_exactly(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_bytes(DOCS[1].encode("utf-8"))  # written as bytes: CRLF must survive
    jsonl = write_jsonl(tmp_path / "b.jsonl", [{"text": DOCS[0]}, {"text": DOCS[2], "id": 7}])
    gz = write_jsonl(tmp_path / "c.jsonl.gz", [{"body": DOCS[3]}], opener=gzip.open)
    summary = run_preprocess([txt, jsonl], tmp_path / "out", workers=2)
    assert decoded_documents(tmp_path / "out") == [DOCS[1], DOCS[0], DOCS[2]]
    assert summary["documents_kept"] == 3 and summary["tokens"] == sum(map(len, stored_documents(tmp_path / "out")))
    assert json.loads((tmp_path / "out.summary.json").read_text()) == summary
    run_preprocess([gz], tmp_path / "gz", json_key="body")
    assert decoded_documents(tmp_path / "gz") == [DOCS[3]]


def test_exact_and_near_duplicates_are_dropped_and_counted(tmp_path):
    words = [f"w{i}" for i in range(400)]
    base = " ".join(words)
    near = " ".join(words[:200] + ["changed"] + words[201:])  # one word of 400: Jaccard ~0.98
    far = " ".join(words[:300] + [f"x{i}" for i in range(100)])  # a quarter rewritten: kept
    records = [{"text": base}, {"text": base}, {"text": near}, {"text": far}, {"text": "  \n"}, {"text": "other"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    plain = run_preprocess([path], tmp_path / "exact")
    assert decoded_documents(tmp_path / "exact") == [base, near, far, "other"]
    assert (plain["exact_duplicates"], plain["near_duplicates"], plain["skipped"]) == (1, 0, {"empty": 1})
    both = run_preprocess([path], tmp_path / "near", near_dedup=True)
    assert decoded_documents(tmp_path / "near") == [base, far, "other"]
    assert (both["records_read"], both["documents_kept"], both["exact_duplicates"], both["near_duplicates"]) == (6, 3, 1, 1)


def test_bad_records_stop_the_run_naming_file_line_and_fix(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9 in latin-1"}\nnot json\n{"body": "x"}\n{"text": 5}\n')
    prefix = tmp_path / "out"
    with pytest.raises(PreprocessError, match=rf"{path}:2: bytes are not UTF-8.*Fix: convert the file to UTF-8"):
        run_preprocess([path], prefix)
    assert not DatasetFiles.of(prefix).work.exists() and not list(tmp_path.glob("out*"))
    summary = run_preprocess([path], prefix, skip_bad_records=True)
    assert summary["skipped"] == {"invalid_json": 1, "missing_field": 1, "not_a_string": 1, "undecodable": 1}
    assert summary["documents_kept"] == 1 and decoded_documents(prefix) == ["fine"]
    assert summary["skipped_examples"][1].startswith(f"{path}:3: not valid JSON")
    assert "no 'text' field (found keys 'body')" in summary["skipped_examples"][2]

    path.write_text('{"body": "x"}\n')
    with pytest.raises(PreprocessError, match=r":1: no 'text' field .* pass --json-key"):
        run_preprocess([path], tmp_path / "other")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"line one\nna\xefve\n")
    with pytest.raises(PreprocessError, match=rf"{latin}:2: bytes are not UTF-8 at byte offset 11"):
        run_preprocess([latin], tmp_path / "other")


def test_bad_arguments_fail_before_any_work_and_leave_existing_output_untouched(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "hello world"}])
    prefix = tmp_path / "ds"
    run_preprocess([good], prefix)
    before = {p: p.read_bytes() for p in tmp_path.glob("ds.*") if p.is_file()}

    def cli(*args):
        code = opt_ds_main(["preprocess", "--no-progress", *map(str, args)])
        return code, capsys.readouterr().err

    code, err = cli(good, "--output-prefix", prefix, "--tokenizer", "opt")
    assert code == 2 and "output already exists" in err and "--overwrite" in err
    code, err = cli(tmp_path / "missing.jsonl", "--output-prefix", prefix, "--tokenizer", "opt", "--overwrite")
    assert code == 2 and "missing.jsonl: no such file or directory" in err
    (tmp_path / "data.csv").write_text("a,b\n")
    code, err = cli(tmp_path / "data.csv", "--output-prefix", tmp_path / "x", "--tokenizer", "opt")
    assert code == 2 and "unknown input type" in err
    code, err = cli(good, "--output-prefix", tmp_path / "x", "--tokenizer", tmp_path)
    assert code == 2 and "expected vocab.json and merges.txt" in err
    code, err = cli(good, "--output-prefix", tmp_path / "x", "--vocab-size", "100")
    assert code == 2 and "at least 260" in err
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": " "}])
    code, err = cli(empty, "--output-prefix", prefix, "--tokenizer", "opt", "--overwrite")  # fails mid-run
    assert code == 2 and "no documents left to write: read 2 records; skipped 2 empty" in err
    assert {p: p.read_bytes() for p in tmp_path.glob("ds.*") if p.is_file()} == before
    assert not DatasetFiles.of(prefix).work.exists()

    (tmp_path / "blank.txt").write_text("")
    code, err = cli(tmp_path / "blank.txt", good, "--output-prefix", prefix, "--vocab-size", "300", "--overwrite")
    assert code == 0  # an empty file among others is counted and skipped, not an error
    assert json.loads((tmp_path / "ds.summary.json").read_text())["skipped"] == {"empty": 1}
    assert (tmp_path / "ds.bin").read_bytes() != before[tmp_path / "ds.bin"]  # replaced by the new tokenization
    assert decoded_documents(prefix) == ["hello world"]


def test_unfinished_run_with_other_arguments_is_not_mixed_in(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "hello"}])
    files = DatasetFiles.of(tmp_path / "ds")
    files.work.mkdir()
    (files.work / "manifest.json").write_text(json.dumps({"format": 1, "json_key": "body"}))
    with pytest.raises(PartialRunError, match="unfinished run with other arguments.*pass --restart"):
        run_preprocess([good], files.prefix)
    with open(files.work / "lock", "w") as lock:  # as a concurrent run holds it
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(PartialRunError, match="another `opt-ds preprocess` is writing"):
            run_preprocess([good], files.prefix, restart=True)
    assert run_preprocess([good], files.prefix, restart=True)["documents_kept"] == 1


def test_bundled_corpus_with_trained_bpe_round_trips(tmp_path):
    summary = run_preprocess([BUNDLED_CORPUS], tmp_path / "shk", tokenizer=None, vocab_size=2000, workers=2)
    with gzip.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
        originals = [json.loads(line)["text"] for line in f]
    assert decoded_documents(tmp_path / "shk") == originals
    assert summary["tokenizer"]["vocab_size"] == 2000 and summary["token_dtype"] == "uint16"
    assert summary["documents_kept"] == 90 and 500_000 < summary["tokens"] < 1_500_000


def test_killed_run_resumes_to_the_same_output(tmp_path):
    reference = run_preprocess([BUNDLED_CORPUS], tmp_path / "ref", workers=2, chunk_mb=0.02)
    prefix = tmp_path / "ds"
    files = DatasetFiles.of(prefix)
    command = [sys.executable, "-m", "opt_ds", "preprocess", "--bundled-corpus", "--output-prefix", str(prefix),
               "--tokenizer", "opt", "--workers", "1", "--chunk-mb", "0.02", "--no-progress"]
    proc = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    # a finished chunk's marker (000000.json); its temp file while being written is hidden (.000000.json.XXXXXXXX.json)
    while not list(files.work.glob("chunks/[0-9]*.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate()[0].decode()
    assert proc.returncode == -signal.SIGKILL, f"preprocess finished before it could be interrupted:\n{out}"
    assert not files.bin.exists() and not files.idx.exists()  # nothing half-written under the final names

    resumed = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(files.summary.read_text())
    assert 0 < summary["resumed_chunks"] < summary["chunks"] == reference["chunks"]
    assert f"resumed {summary['resumed_chunks']} of {summary['chunks']} chunks" in resumed.stdout
    for suffix in (".bin", ".idx"):  # byte-identical to the uninterrupted run (which had 2 workers)
        assert prefix.with_name("ds" + suffix).read_bytes() == prefix.with_name("ref" + suffix).read_bytes()
    assert not files.work.exists()
    assert np.isclose(summary["tokens"], reference["tokens"])
