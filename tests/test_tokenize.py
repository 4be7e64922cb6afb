"""The tokenize stage: round trip, determinism, resume, quarantine of bad records, S3, clear errors,
the python-source corpus."""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.data import corpus
from app.data.corpus import InputError, TokenizeConfig, tokenize_corpus
from app.data.shards import read_shard
from app.data.tokenizer import load_tokenizer

DOCS = [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(i % 40 + 3)) for i in range(300)]


@pytest.fixture
def inputs(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    with open(d / "a.jsonl", "w") as f:
        for t in DOCS[:150]:
            f.write(json.dumps({"text": t}) + "\n")
    pq.write_table(pa.table({"text": DOCS[150:250]}), d / "b.parquet")
    (d / "c.txt").write_text("\n\n".join(DOCS[250:]))
    return d


def _cfg(inputs, out, **kw):
    return TokenizeConfig(inputs=[str(inputs / "*")], output=str(out), vocab_size=400, text_unit="paragraph",
                          val_fraction=0.2, shard_tokens=1000, **kw)


def _decoded_docs(m):
    tok = load_tokenizer(m.tokenizer_path)
    docs = []
    for split in ("train", "val"):
        if not m.shard_paths(split):
            continue
        tokens = np.concatenate([read_shard(p) for p in m.shard_paths(split)]).tolist()
        cut = [i for i, t in enumerate(tokens) if t == m.eot_id]
        assert cut and cut[-1] == len(tokens) - 1  # every document ends with end-of-text
        starts = [0] + [c + 1 for c in cut[:-1]]
        docs += [tok.decode(tokens[s:e]) for s, e in zip(starts, cut)]
    return docs


def test_round_trip_gives_back_the_documents(ray_session, inputs, tmp_path):
    m = tokenize_corpus(_cfg(inputs, tmp_path / "out"))
    assert sorted(_decoded_docs(m)) == sorted(DOCS)
    assert m.docs["train"] + m.docs["val"] == 300 and m.docs["val"] > 20
    assert all(s["n_tokens"] == 1000 for s in m.shards["train"][:-1])
    assert m.dtype == "uint16" and m.inputs == 3 and m.rejected == {}
    assert (tmp_path / "out" / "tokenizer.json").exists() and not (tmp_path / "out" / "_work").exists()


def test_same_input_gives_identical_bytes(ray_session, inputs, tmp_path):
    a, b = tokenize_corpus(_cfg(inputs, tmp_path / "a")), tokenize_corpus(_cfg(inputs, tmp_path / "b"))
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b"))
    for n in names:
        if n.endswith((".bin", ".json")) and n != "manifest.json":
            assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
    ja, jb = a.to_json(), b.to_json()
    assert ja["config"].pop("output") != jb["config"].pop("output")  # the only difference
    assert ja == jb


def test_interrupted_run_resumes_without_redoing_work(ray_session, inputs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = _cfg(inputs, out)
    real_pack = corpus._pack

    def crash(*a, **k):
        raise KeyboardInterrupt("simulated interruption after tokenizing")

    monkeypatch.setattr(corpus, "_pack", crash)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(cfg)
    work = sorted((out / "_work").iterdir())
    stamps = {p.name: p.stat().st_mtime_ns for p in work}
    assert len([p for p in work if p.suffix == ".json"]) == 3
    monkeypatch.setattr(corpus, "_pack", real_pack)
    m = tokenize_corpus(TokenizeConfig(**{**cfg.__dict__, "keep_work": True}))
    assert {p.name: p.stat().st_mtime_ns for p in (out / "_work").iterdir()} == stamps  # nothing re-tokenized
    first_shard = Path(m.shard_paths("train")[0])
    before = first_shard.stat().st_mtime_ns
    again = tokenize_corpus(TokenizeConfig(**{**cfg.__dict__, "keep_work": True}))
    assert first_shard.stat().st_mtime_ns == before and again.to_json() == m.to_json()
    assert sorted(_decoded_docs(m)) == sorted(DOCS)


def test_bad_records_are_counted_and_quarantined(ray_session, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    lines = [json.dumps({"text": "good one"}).encode(), b"{broken json", json.dumps({"title": "no text"}).encode(),
             json.dumps({"text": "   "}).encode(), b'{"text": "bad \xff\xfe utf8"}', json.dumps({"text": 5}).encode(),
             json.dumps({"text": "good two"}).encode(), b'["not", "an", "object"]']
    (d / "x.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    m = tokenize_corpus(TokenizeConfig(inputs=[str(d / "x.jsonl")], output=str(tmp_path / "out"), vocab_size=300,
                                       val_fraction=0.0))
    assert m.rejected == {"bad_json": 1, "empty_text": 1, "invalid_utf8": 1, "missing_field": 2, "not_a_string": 1}
    assert m.docs == {"train": 2, "val": 0}
    rows = [json.loads(x) for x in (tmp_path / "out" / "rejected" / "rejected.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in rows) == sorted(["bad_json", "missing_field", "empty_text", "invalid_utf8",
                                                        "not_a_string", "missing_field"])
    assert sorted(_decoded_docs(m)) == ["good one", "good two"]


def test_missing_input_fails_fast(tmp_path):
    with pytest.raises(InputError, match="matches no file"):
        tokenize_corpus(TokenizeConfig(inputs=[str(tmp_path / "nope*.txt")], output=str(tmp_path / "o")))
    r = subprocess.run([sys.executable, "-m", "jobs.tokenize", "--inputs=/nonexistent/x.txt", f"--output={tmp_path}/o"],
                       capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert r.returncode == 2  # a configuration error, refused before Ray starts
    assert r.stderr.strip().splitlines() == ["tokenize: input '/nonexistent/x.txt' matches no file"]


def test_gpt2_tokenizer_on_tinyshakespeare(ray_session, shared_data, tmp_path):
    m = tokenize_corpus(TokenizeConfig(inputs=[str(shared_data / "tinyshakespeare.txt")], output=str(tmp_path / "o"),
                                       tokenizer=str(shared_data / "gpt2_tokenizer" / "tokenizer.json"),
                                       val_fraction=0.0))
    assert m.vocab_size == 50257 and m.eot_id == 50256 and m.dtype == "uint16"
    assert m.num_tokens("train") == 338_025 + 1  # the published count, plus one end-of-text


def test_s3_output(ray_session, s3_prefix, inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("SPOTLM_CACHE", str(tmp_path / "cache"))
    m = tokenize_corpus(_cfg(inputs, f"{s3_prefix}/shards"))
    assert m.root.startswith("s3://")
    assert sorted(_decoded_docs(m)) == sorted(DOCS)


def test_char_tokenizer_and_tail_split(ray_session, tmp_path):
    """nanoGPT's shakespeare_char data: one id per character, the head of the text trains, the tail validates."""
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20
    (tmp_path / "in.txt").write_text(text)
    m = tokenize_corpus(TokenizeConfig(inputs=[str(tmp_path / "in.txt")], output=str(tmp_path / "out"),
                                       tokenizer="char", split="tail", val_fraction=0.1))
    tok = load_tokenizer(m.tokenizer_path)
    assert m.vocab_size == len(set(text)) + 2  # the characters, <|endoftext|> and [UNK]
    train, val = (read_shard(p) for p in (m.shard_paths("train")[0], m.shard_paths("val")[0]))
    cut = round(len(text) * 0.9)
    assert tok.decode(train[:-1].tolist()) == text[:cut] and tok.decode(val[:-1].tolist()) == text[cut:]
    assert len(train) == cut + 1 and train[-1] == m.eot_id


def _py_tree(root: Path) -> dict[str, str]:
    """A small tree of .py files: distinct modules, two exact copies, a non-.py file, an undecodable .py."""
    files = {f"pkg{i % 3}/mod{i}.py": f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(40)}
    files["copy/a.py"] = files["pkg0/mod0.py"]
    files["copy/b.py"] = files["pkg1/mod1.py"]
    files["pkg0/notes.txt"] = "not python"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "pkg2" / "latin1.py").write_bytes(b"# caf\xe9\nx = 1\n")
    return files


def _py_cfg(root, out, **kw):
    return TokenizeConfig(corpus="python", inputs=[str(root)], output=str(out), vocab_size=300, val_fraction=0.3,
                          files_per_task=7, **kw)


def test_python_corpus_dedups_splits_by_file_and_lists_files(ray_session, tmp_path):
    root = tmp_path / "src"
    files = _py_tree(root)
    m = tokenize_corpus(_py_cfg(root, tmp_path / "out"))
    rows = [json.loads(x) for x in (tmp_path / "out" / "files.jsonl").read_text().splitlines()]
    kept = {r["path"]: r for r in rows}
    # 40 distinct modules + the undecodable one; of each pair of copies the first path in sorted order stays
    assert len(rows) == 41 and str(root / "copy" / "a.py") in kept and str(root / "pkg0" / "mod0.py") not in kept
    assert not any(p.endswith(".txt") for p in kept)
    assert kept[str(root / "pkg2" / "latin1.py")]["split"] == "none" and m.rejected == {"invalid_utf8": 1}
    good = [r for r in rows if r["split"] != "none"]
    assert {r["split"] for r in good} == {"train", "val"}  # each file wholly in one split, both splits used
    for r in good:  # the split follows the content hash; the counts are the file's tokens plus end-of-text
        text = Path(r["path"]).read_text()
        assert r["hash"] == f"{corpus.content_hash(text.encode()):016x}"
        assert r["split"] == corpus.split_of(text, 0.3)
        assert r[r["split"]] == len(load_tokenizer(m.tokenizer_path).encode(text).ids) + 1
    assert sum(r["train"] for r in rows) == m.num_tokens("train") and sum(r["val"] for r in rows) == m.num_tokens("val")
    summary = json.loads((tmp_path / "out" / "corpus.json").read_text())
    assert summary["found"] == 43 and summary["duplicates"] == 2 and summary["roots"] == [str(root)]
    assert summary["files"] == dict(Counter(r["split"] for r in rows))
    assert summary["tokens"] == {"train": m.num_tokens("train"), "val": m.num_tokens("val")}
    assert sorted(_decoded_docs(m)) == sorted({t for rel, t in files.items() if rel.endswith(".py")})


def test_python_corpus_is_deterministic_across_task_sizes(ray_session, tmp_path):
    root = tmp_path / "src"
    _py_tree(root)
    a = tokenize_corpus(_py_cfg(root, tmp_path / "a"))
    b = tokenize_corpus(TokenizeConfig(**{**_py_cfg(root, tmp_path / "b").__dict__, "files_per_task": 0}))
    for split in ("train", "val"):
        assert [s["sha256"] for s in a.shards[split]] == [s["sha256"] for s in b.shards[split]]
    assert (tmp_path / "a" / "files.jsonl").read_text() == (tmp_path / "b" / "files.jsonl").read_text()


def test_python_corpus_defaults_to_this_interpreters_sources():
    import sysconfig

    roots = corpus.python_roots()
    assert os.path.realpath(sysconfig.get_paths()["stdlib"]) in roots
    assert all(not a.startswith(b + os.sep) for a in roots for b in roots)  # none nested in another


def test_python_corpus_root_must_be_a_directory(tmp_path):
    r = subprocess.run([sys.executable, "-m", "jobs.tokenize", "--corpus=python", f"--inputs={tmp_path}/nope",
                        f"--output={tmp_path}/o"], capture_output=True, text=True, cwd=Path(__file__).parents[1],
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"tokenize: python corpus root '{tmp_path}/nope' is not a local directory"]
