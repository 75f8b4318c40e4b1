"""Preprocessing: stdlib sources -> indexed datasets read back by megatron-core; bad inputs; tools."""
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time

import numpy as np
import pytest

from megatron_diffu.data.indexed import DatasetFormatError, validate_indexed_dataset
from megatron_diffu.data.preprocess import InputError, PreprocessConfig, run_preprocess
from megatron_diffu.data.tokenizer import build_tokenizer, qwen_tokenizer_path, train_sentencepiece

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STDLIB = sysconfig.get_paths()["stdlib"]
SUBSET = [os.path.join(STDLIB, d) for d in ("json", "email/mime")]  # ~80 kB; email/mime/__init__.py is empty
EXCLUDE = ["test", "tests", "site-packages", "__pycache__"]


def reference_corpus(roots):
    """The corpus rule, written independently: sorted walk, .py only, no test dirs, UTF-8 only (empty files
    are documents, as in Megatron-LM)."""
    docs, skipped = [], []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDE)
            for name in sorted(f for f in filenames if f.endswith(".py")):
                path = os.path.join(dirpath, name)
                data = open(path, "rb").read()
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    skipped.append(path)
                    continue
                docs.append((path, text))
    return docs, skipped


def preprocess(prefix, inputs, **kw):
    cfg = PreprocessConfig(input=list(inputs), output_prefix=str(prefix), extensions=kw.pop("extensions", [".py"]),
                           exclude_dirs=EXCLUDE, append_eod=kw.pop("append_eod", True), log_interval=0, **kw)
    return run_preprocess(cfg)


@pytest.fixture(scope="module")
def qwen():
    return build_tokenizer()


@pytest.fixture(scope="module")
def stdlib_w1(tmp_path_factory):
    out = tmp_path_factory.mktemp("w1") / "stdlib"
    summary = preprocess(out, SUBSET, workers=1, skip_bad=True, chunk_bytes=1 << 14)
    return summary


def test_stdlib_read_back_token_exact_by_megatron(stdlib_w1, qwen):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import Tokenizer as RawTokenizer

    prefix = stdlib_w1.outputs["text"]
    docs, skipped = reference_corpus(SUBSET)
    nonempty = [(path, text) for path, text in docs if text]
    n_empty = len(docs) - len(nonempty)
    assert len(docs) > 10 and n_empty  # email/mime/__init__.py etc. are empty: kept, as Megatron keeps them
    assert sorted(w for w, _ in stdlib_w1.skipped) == sorted(skipped)
    assert stdlib_w1.empty == n_empty and f"empty documents kept: {n_empty}" in stdlib_w1.format()
    raw = RawTokenizer.from_file(qwen_tokenizer_path())  # the tokenizer's own encoding, unmodified file
    ds = IndexedDataset(prefix)
    assert len(ds) == len(nonempty) and stdlib_w1.documents == len(docs)
    assert ds.index.dtype == np.int32  # Qwen's 151668 ids do not fit uint16
    total = 0
    for i, (path, text) in enumerate(nonempty):
        expected = raw.encode(text, add_special_tokens=False).ids + [151643]  # --append-eod: <|endoftext|>
        assert ds[i].tolist() == expected, path
        total += len(expected)
    assert total == stdlib_w1.tokens == int(ds.sequence_lengths.sum())
    # an empty document has no sequence: the document index repeats (Megatron's add_document([], []))
    assert list(ds.document_indices) == [0] + list(np.cumsum([1 if text else 0 for _, text in docs]))


def _megatron_reference(prefix: str, texts, tok) -> None:
    """Megatron-LM tools/preprocess_data.py's rule, written independently of ours: per document
    doc_ids = tokenize(text); EOD appended only when doc_ids is non-empty; add_document(doc_ids,
    [len] or []), one builder, finalize."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for text in texts:
        ids = tok.encode(text)
        lens = [len(ids)] if ids else []
        if ids:
            ids = ids + [tok.eod_id]
            lens[-1] += 1
        builder.add_document(np.asarray(ids, dtype=np.int32), lens)
    builder.finalize(prefix + ".idx")


def test_empty_documents_keep_bin_idx_byte_identical_to_megatron(stdlib_w1, qwen, tmp_path):
    """Directory input (empty __init__.py files) and JSONL input (an empty text) against Megatron's rule."""
    docs, _ = reference_corpus(SUBSET)
    ref = str(tmp_path / "megatron_text_document")
    _megatron_reference(ref, [t for _, t in docs], qwen)
    for ext in (".bin", ".idx"):
        assert open(stdlib_w1.outputs["text"] + ext, "rb").read() == open(ref + ext, "rb").read(), ext
    src = _write(tmp_path / "e.jsonl", b'{"text": ""}\n{"text": "x = 1"}\n{"text": ""}\n{"text": "  "}\n')
    summary = preprocess(tmp_path / "e", [src], workers=1)  # no --skip-bad needed: not an error
    assert summary.documents == 4 and summary.empty == 2 and not summary.skipped
    ref2 = str(tmp_path / "megatron_e")
    _megatron_reference(ref2, ["", "x = 1", "", "  "], qwen)
    for ext in (".bin", ".idx"):
        assert open(summary.outputs["text"] + ext, "rb").read() == open(ref2 + ext, "rb").read(), ext


def test_two_workers_write_identical_bytes(stdlib_w1, tmp_path):
    summary = preprocess(tmp_path / "w2", SUBSET, workers=2, skip_bad=True, chunk_bytes=1 << 14)
    for ext in (".bin", ".idx"):
        a = open(stdlib_w1.outputs["text"] + ext, "rb").read()
        b = open(summary.outputs["text"] + ext, "rb").read()
        assert a == b, ext
    assert summary.skipped == stdlib_w1.skipped
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_jsonl_input_equals_directory_input(stdlib_w1, tmp_path):
    docs, _ = reference_corpus(SUBSET)
    half = len(docs) // 2
    for name, part in (("a.jsonl", docs[:half]), ("b.jsonl", docs[half:])):
        with open(tmp_path / name, "w", encoding="utf-8") as f:
            for path, text in part:
                f.write(json.dumps({"text": text, "path": path}) + "\n")
            f.write("\n")  # blank lines are ignored
    summary = preprocess(tmp_path / "js", [str(tmp_path / "*.jsonl")], workers=2, chunk_bytes=1 << 13)
    for ext in (".bin", ".idx"):
        assert open(summary.outputs["text"] + ext, "rb").read() == open(stdlib_w1.outputs["text"] + ext, "rb").read()


def _write(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


@pytest.mark.parametrize("line,expect", [
    (b'{"text": "ok"\n', r"bad\.jsonl:3 \(byte offset \d+\): malformed JSON"),
    (b'{"content": "x"}\n', r"bad\.jsonl:3 .*missing key 'text' \(keys present: content"),
    (b'{"text": 5}\n', r"bad\.jsonl:3 .*key 'text' holds int"),
    (b'{"text": "caf\xe9"}\n', r"bad\.jsonl:3 .*not UTF-8: invalid byte 0xe9 at byte 13 of the line"),
])
def test_bad_jsonl_lines_name_file_and_line(tmp_path, line, expect):
    good = b'{"text": "print(1)"}\n{"text": "x = 2"}\n'
    src = _write(tmp_path / "bad.jsonl", good + line + good)
    with pytest.raises(InputError, match=expect) as err:
        preprocess(tmp_path / "o", [src], workers=1)
    assert "--skip-bad" in str(err.value)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("o")]  # nothing left behind
    summary = preprocess(tmp_path / "o", [src], workers=2, skip_bad=True)
    assert summary.documents == 4 and len(summary.skipped) == 1
    assert "bad.jsonl:3" in summary.skipped[0][0]
    assert "skipped 1 inputs" in summary.format()


def test_bad_source_files(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    _write(d / "a.py", b"x = 1\n")
    _write(d / "b.py", b"# caf\xe9\n")
    _write(d / "c.py", b"")
    _write(d / "d.txt", b"ignored by --extensions")
    with pytest.raises(InputError, match=r"b\.py: not UTF-8: invalid byte 0xe9 at byte 5 of the file"):
        preprocess(tmp_path / "o", [str(d)], workers=2, chunk_bytes=1)  # raised in a worker process
    assert sorted(os.listdir(tmp_path)) == ["src"]
    summary = preprocess(tmp_path / "o", [str(d)], workers=1, skip_bad=True)
    assert summary.documents == 2 and summary.empty == 1  # c.py is empty: kept (Megatron's rule), counted
    assert [os.path.basename(w) for w, _ in summary.skipped] == ["b.py"]
    with pytest.raises(InputError, match="matches no files"):
        preprocess(tmp_path / "o", [str(tmp_path / "nothing*.jsonl")])
    with pytest.raises(InputError, match="no such file"):
        preprocess(tmp_path / "o", [str(tmp_path / "missing.jsonl")])


def _corrupt_copies(prefix, tmp_path):
    bin_b, idx_b = open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()
    cases = {
        "trunc_idx": (bin_b, idx_b[:-8], r"\.idx: size .* does not match its header"),
        "tiny_idx": (bin_b, idx_b[:20], r"truncated index: 20 bytes"),
        "trunc_bin": (bin_b[:-4], idx_b, r"\.bin: size .* truncated or mismatched"),
        "magic": (bin_b, b"XXXXXXXXX" + idx_b[9:], r"not a Megatron index \(byte offset 0"),
        "version": (bin_b, idx_b[:9] + (2).to_bytes(8, "little") + idx_b[17:], r"unsupported index version 2"),
        "pointer": (bin_b, idx_b[:-9] + b"\x01" + idx_b[-8:], r"document index must rise|sequence pointer"),
    }
    for name, (b, i, msg) in cases.items():
        p = str(tmp_path / name)
        _write(p + ".bin", b)
        _write(p + ".idx", i)
        yield name, p, msg


def test_corrupt_and_missing_datasets_are_named(stdlib_w1, tmp_path, qwen):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = stdlib_w1.outputs["text"]
    info = validate_indexed_dataset(prefix, vocab_size=qwen.vocab_size, check_tokens=True)
    assert info.num_documents == len(IndexedDataset(prefix).document_indices) - 1 == stdlib_w1.documents
    assert info.num_tokens == stdlib_w1.tokens
    for name, p, msg in _corrupt_copies(prefix, tmp_path):
        with pytest.raises(DatasetFormatError, match=msg):
            validate_indexed_dataset(p)
    with pytest.raises(DatasetFormatError, match=r"not found: missing .*\.idx.*Did you mean .*_text_document"):
        validate_indexed_dataset(prefix[: -len("_text_document")])
    with pytest.raises(DatasetFormatError, match="without the .bin/.idx extension"):
        validate_indexed_dataset(prefix + ".bin")


def test_dtype_and_vocab_mismatch(tmp_path, qwen):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    files = [os.path.join(STDLIB, "json", f) for f in ("decoder.py", "encoder.py")]
    sp_model = train_sentencepiece(files, 600, str(tmp_path / "sp"))
    s = preprocess(tmp_path / "sp", files, workers=1, tokenizer_type="SentencePieceTokenizer",
                   tokenizer_model=sp_model)
    sp_prefix = s.outputs["text"]
    assert validate_indexed_dataset(sp_prefix).dtype == np.uint16  # small vocab: uint16 like Megatron
    with pytest.raises(DatasetFormatError, match=r"stored as uint16 .* tokenizer has 151668 ids"):
        validate_indexed_dataset(sp_prefix, vocab_size=qwen.vocab_size)
    # int32 data holding ids beyond a (smaller) vocabulary: found by the token scan, with its offset
    b = IndexedDatasetBuilder(str(tmp_path / "big.bin"), dtype=np.int32)
    b.add_document(np.array([1, 2, 151700], dtype=np.int32), [3])
    b.finalize(str(tmp_path / "big.idx"))
    with pytest.raises(DatasetFormatError, match=r"token id 151700 at token 2 \(byte offset 8\)"):
        validate_indexed_dataset(str(tmp_path / "big"), vocab_size=qwen.vocab_size, check_tokens=True)


def test_merge_and_stats_tools(stdlib_w1, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    sys.path.insert(0, os.path.join(REPO, "tools"))
    import dataset_stats
    import merge_datasets

    prefix = stdlib_w1.outputs["text"]
    out = merge_datasets.merge_datasets([prefix, prefix], str(tmp_path / "m"))
    a, m = IndexedDataset(prefix), IndexedDataset(str(tmp_path / "m"))
    assert len(m) == 2 * len(a) and out["tokens"] == 2 * stdlib_w1.tokens
    assert all(np.array_equal(m[i], a[i % len(a)]) for i in range(len(m)))
    text = dataset_stats.stats_text(prefix)
    assert f"{stdlib_w1.documents} documents, {stdlib_w1.tokens} tokens" in text
    lengths = dataset_stats.document_lengths(prefix)
    assert lengths.sum() == stdlib_w1.tokens and len(lengths) == stdlib_w1.documents
    hist_total = sum(int(line.split(")")[1].split()[0]) for line in dataset_stats.histogram_lines(lengths))
    assert hist_total == stdlib_w1.documents


@pytest.mark.slow
def test_sigterm_leaves_no_dataset(tmp_path):
    """A SIGTERM'd run removes its temporary files and leaves no .bin/.idx (exit code 143)."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", STDLIB,
           "--extensions", ".py", "--exclude-dirs", ",".join(EXCLUDE), "--skip-bad", "--append-eod",
           "--workers", "2", "--chunk-bytes", "65536", "--log-interval", "0.2",
           "--output-prefix", str(tmp_path / "big")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    deadline = time.monotonic() + 120
    seen = ""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen += line
        if line.startswith("[preprocess]") or proc.poll() is not None:
            break
    assert "[preprocess]" in seen, seen
    assert any(".tmp-" in p for p in os.listdir(tmp_path))  # work in progress exists
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "no output written" in err
    assert os.listdir(tmp_path) == []  # no .bin, no .idx, no temporary directory
