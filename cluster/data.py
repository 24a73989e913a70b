"""Probe datasets: bundled with the installed packages (no download at run time), and
windows of token ids read from a text, Parquet or Arrow file (:func:`token_windows`)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = ["digits", "digits_tensors", "bigram_chain", "tokens", "tokens_tensors", "token_windows", "TokenWindows"]

PAD_ID = 0  # input id at padded positions (their targets are IGNORE_INDEX)
IGNORE_INDEX = -100  # as probe.batches: targets that no token-mean loss counts


def digits_tensors(
    *, split: str = "train", test_fraction: float = 0.25, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8×8 digits (1,797 images, 10 classes) as ``(x, y)`` tensors.

    Pixels are scaled to [0, 1] (the raw range is 0..16) and flattened to 64
    features. The train/test split is a fixed permutation drawn from ``seed``.

    Raises:
        ValueError: for a ``split`` other than ``"train"``, ``"test"`` or ``"all"``.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got split={split!r}")
    pixels, labels = load_digits(return_X_y=True)  # (1797, 64) in 0..16, (1797,)
    x = torch.tensor(pixels / 16.0, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.long)
    if split == "all":
        return x, y
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    idx = order[n_test:] if split == "train" else order[:n_test]
    idx_t = torch.as_tensor(idx)
    return x[idx_t], y[idx_t]


def digits(*, split: str = "train", test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """The digits data as a map-style dataset of ``(features[64], label)`` pairs."""
    return TensorDataset(*digits_tensors(split=split, test_fraction=test_fraction, seed=seed))


def bigram_chain(vocab: int, *, seed: int = 0, sharpness: float = 2.0) -> torch.Tensor:
    """A fixed random Markov chain over ``vocab`` tokens: row ``i`` is ``P(next | i)``, ``(vocab, vocab)`` float64.

    Rows are ``softmax(sharpness · z)`` with standard normal ``z`` drawn from ``seed``,
    so each token has a few likely successors and the chain's entropy rate lies well
    below ``log(vocab)``: a model can learn something.
    """
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(vocab, vocab, generator=g, dtype=torch.float64), dim=1)


def tokens_tensors(
    *,
    num_sequences: int = 256,
    seq_len: int = 16,
    vocab: int = 16,
    seed: int = 0,
    chain_seed: int = 0,
    min_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token data from :func:`bigram_chain`: ``(ids, targets)``, each ``(num_sequences, seq_len)`` int64.

    Each sequence is ``seq_len + 1`` tokens (the first uniform, then the chain's
    transitions); ``ids`` are its first ``seq_len`` tokens and ``targets`` its last
    ``seq_len`` (the next token at every position). With ``min_len``, sequence
    ``i`` keeps a length drawn uniformly from ``[min_len, seq_len]``: beyond it ids
    are ``PAD_ID`` and targets ``IGNORE_INDEX`` (right padding, so a causal model's
    outputs at kept positions do not see the padding), and sequences hold unequal
    numbers of tokens. The samples are drawn from ``seed``, the chain from ``chain_seed``
    (two sets with different ``seed`` share the chain: a train and a test split).

    Raises:
        ValueError: for ``num_sequences < 1``, ``seq_len < 1``, ``vocab < 2`` or
            ``min_len`` outside ``[1, seq_len]``.
    """
    if num_sequences < 1:
        raise ValueError(f"num_sequences must be at least 1, got num_sequences={num_sequences}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got seq_len={seq_len}")
    if vocab < 2:
        raise ValueError(f"vocab must be at least 2, got vocab={vocab}")
    if min_len is not None and not 1 <= min_len <= seq_len:
        raise ValueError(f"min_len must be in [1, seq_len={seq_len}] or None, got min_len={min_len}")
    chain = bigram_chain(vocab, seed=chain_seed)
    g = torch.Generator().manual_seed(seed)
    seq = torch.empty(num_sequences, seq_len + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(0, vocab, (num_sequences,), generator=g)
    for t in range(seq_len):
        seq[:, t + 1] = torch.multinomial(chain[seq[:, t]], 1, generator=g)[:, 0]
    ids, targets = seq[:, :-1].clone(), seq[:, 1:].clone()
    if min_len is not None:
        lengths = torch.randint(min_len, seq_len + 1, (num_sequences, 1), generator=g)
        padded = torch.arange(seq_len) >= lengths  # (num_sequences, seq_len)
        ids[padded] = PAD_ID
        targets[padded] = IGNORE_INDEX
    return ids, targets


class _TokenDicts(Dataset):
    """Hugging Face style items: ``{"input_ids", "attention_mask", "labels"}``."""

    def __init__(self, ids: torch.Tensor, targets: torch.Tensor) -> None:
        self.ids, self.targets = ids, targets

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": (self.targets[i] != IGNORE_INDEX).long(),
            "labels": self.targets[i],
        }


def tokens(
    *,
    num_sequences: int = 256,
    seq_len: int = 16,
    vocab: int = 16,
    seed: int = 0,
    chain_seed: int = 0,
    min_len: int | None = None,
    as_dict: bool = False,
) -> Dataset:
    """:func:`tokens_tensors` as a map-style dataset: ``(ids[T], next_ids[T])`` pairs, or with
    ``as_dict`` dicts ``{"input_ids", "attention_mask", "labels"}`` (the model is then called
    with the first two as keywords; ``attention_mask`` is 1 at kept positions)."""
    ids, targets = tokens_tensors(
        num_sequences=num_sequences, seq_len=seq_len, vocab=vocab, seed=seed, chain_seed=chain_seed, min_len=min_len
    )
    return _TokenDicts(ids, targets) if as_dict else TensorDataset(ids, targets)


# ---------------------------------------------------------------------------------------------
# token windows from files

TEXT_SUFFIXES = (".txt",)
TABLE_SUFFIXES = (".parquet", ".arrow", ".feather")
LABEL_MODES = ("input_ids", "next")
HF_EXTRA = "pip install landscape-probe[hf]"


class TokenWindows(Dataset):
    """Fixed windows of one token stream as Hugging Face style items (built by :func:`token_windows`).

    Item ``i`` is ``{"input_ids", "attention_mask", "labels"}``, each an int64 tensor of
    ``window`` entries; ``attention_mask`` is all ones. ``labels`` equals ``input_ids``
    (``labels="input_ids"``) or is the next token at every position (``labels="next"``).

    Attributes:
        path: the source file, as given.
        window: tokens per item.
        starts: int64 tensor, the stream offset of each item's first token.
        num_tokens: tokens in the whole stream.
        total_windows: windows the stream holds (``len(self)`` when ``count`` is None).
    """

    def __init__(
        self,
        path: str,
        windows: torch.Tensor,
        starts: torch.Tensor,
        *,
        window: int,
        labels: str,
        num_tokens: int,
        total_windows: int,
    ) -> None:
        self.path, self.window, self.labels = path, window, labels
        self.windows, self.starts = windows, starts  # (n, window) or (n, window + 1) with labels="next"
        self.num_tokens, self.total_windows = num_tokens, total_windows

    def __len__(self) -> int:
        return int(self.windows.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        w = self.windows[i]
        ids, labels = (w[:-1], w[1:]) if self.labels == "next" else (w, w)
        ids = ids.clone()
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": ids.clone() if self.labels == "input_ids" else labels.clone(),
        }

    def __repr__(self) -> str:
        return (
            f"TokenWindows({self.path!r}, window={self.window}, windows={len(self)} of {self.total_windows}, "
            f"tokens={self.num_tokens}, labels={self.labels!r})"
        )


def token_windows(
    path: str | os.PathLike,
    window: int,
    *,
    count: int | None = None,
    seed: int = 0,
    column: str | None = None,
    tokenizer: str | os.PathLike | None = None,
    stride: int | None = None,
    labels: str = "input_ids",
) -> TokenWindows:
    """Windows of ``window`` token ids cut from a file, as a map-style dataset of dicts
    ``{"input_ids", "attention_mask", "labels"}`` (int64 tensors of ``window`` entries,
    the mask all ones) for language-model jobs (``data.factory: cluster.data:token_windows``).

    Sources, by suffix:

    - ``.txt``: UTF-8 text, one document, tokenized with ``tokenizer``;
    - ``.parquet``, ``.arrow`` (Arrow IPC file or stream), ``.feather``: the table's
      ``column``, either lists of token ids (used as they are) or strings (tokenized),
      one document per non-null row. ``column=None`` takes the only column, else
      ``input_ids``, else ``text``.

    The documents' token ids are joined, in file order, into one stream, with the
    tokenizer's EOS id (its SEP id where it has no EOS, as BERT; nothing where it has
    neither) between documents when a ``tokenizer`` is given, and cut into windows
    starting every ``stride`` tokens (default ``window``: non-overlapping; a tail
    shorter than a window is dropped). ``count`` windows are drawn without replacement
    by ``torch.randperm`` from ``torch.Generator().manual_seed(seed)`` and kept in stream
    order; ``count=None`` keeps every window. Nothing depends on Python's hash
    randomization, so every process builds the same windows.

    ``labels="input_ids"`` (default) gives labels equal to ``input_ids``, Hugging Face's
    causal-LM convention (the loss shifts them); ``labels="next"`` gives the next token
    at each position (windows of ``window + 1`` tokens are cut), for losses that do not
    shift, such as ``loss: lm_cross_entropy``.

    ``tokenizer`` is a folder holding a Hugging Face tokenizer (or its ``tokenizer.json``):
    ``tokenizer.json`` is read with the ``tokenizers`` library (its truncation and padding
    switched off, no special tokens added); a folder without one is loaded with
    ``transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)``.
    Nothing is downloaded and nothing is unpickled. Relative paths are taken from the
    current directory.

    Raises:
        FileNotFoundError: for a missing file or tokenizer folder.
        ImportError: for text without the tokenizer libraries (``pip install landscape-probe[hf]``).
        ValueError: one line naming the file (and column) and the fix: an unknown suffix,
            a missing column (the columns are listed), a column of neither token-id lists
            nor strings, negative or null ids, text without ``tokenizer``, ``window < 2``,
            a bad ``stride``/``count``/``labels``, or fewer windows than ``count``.
    """
    path = os.fspath(path)
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(
            f"token_windows({path!r}): window must be an integer of at least 2 tokens, got window={window!r}"
        )
    if stride is not None and (isinstance(stride, bool) or not isinstance(stride, int) or stride < 1):
        raise ValueError(
            f"token_windows({path!r}): stride must be a positive integer or None (= window), got stride={stride!r}"
        )
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(
            f"token_windows({path!r}): count must be a positive integer or None (every window), got count={count!r}"
        )
    if labels not in LABEL_MODES:
        raise ValueError(f"token_windows({path!r}): labels must be one of {LABEL_MODES}, got labels={labels!r}")
    stride = window if stride is None else stride
    local = os.path.expanduser(path)
    if not os.path.exists(local):
        raise FileNotFoundError(
            f"token_windows: data file {path!r} does not exist (relative paths are taken from "
            f"{os.getcwd()!r}); check data.kwargs.path"
        )
    if os.path.isdir(local):
        raise ValueError(
            f"token_windows: {path!r} is a folder; give one {'/'.join(TEXT_SUFFIXES + TABLE_SUFFIXES)} file"
        )
    suffix = os.path.splitext(local)[1].lower()
    if suffix not in TEXT_SUFFIXES + TABLE_SUFFIXES:
        raise ValueError(
            f"token_windows: cannot read {path!r} (suffix {suffix or 'none'!r}); "
            f"give a {', '.join(TEXT_SUFFIXES + TABLE_SUFFIXES)} file"
        )
    tok = None if tokenizer is None else _Tokenizer(os.fspath(tokenizer), path)

    if suffix in TEXT_SUFFIXES:
        if column is not None:
            raise ValueError(f"token_windows({path!r}): column={column!r} applies to Parquet/Arrow files only; drop it")
        if tok is None:
            raise ValueError(
                f"token_windows({path!r}): the text must be tokenized: give tokenizer: the model folder "
                f"(one holding tokenizer.json)"
            )
        try:
            with open(local, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"token_windows({path!r}): not UTF-8 text ({exc.reason} at byte {exc.start}); convert the file to UTF-8"
            ) from None
        stream = np.asarray(tok.encode([text])[0], dtype=np.int64)
    else:
        stream = _table_stream(local, path, column, tok)

    span = window + 1 if labels == "next" else window
    n_tokens = int(stream.shape[0])
    total = (n_tokens - span) // stride + 1 if n_tokens >= span else 0
    if total < (1 if count is None else count):
        extra = " + 1 (labels='next')" if labels == "next" else ""
        wanted, fix = (
            ("not one window", "lower window")
            if count is None
            else (f"fewer than count={count}", "lower count or window")
        )
        raise ValueError(
            f"token_windows({path!r}): {n_tokens} tokens make {total} window(s) of {window}{extra} tokens every "
            f"{stride}, {wanted}; {fix}, or give a longer file"
        )
    ids = torch.from_numpy(np.ascontiguousarray(stream))
    all_windows = ids.unfold(0, span, stride)  # (total, span), a view
    if count is None:
        chosen = torch.arange(total)
        windows = all_windows
    else:
        g = torch.Generator().manual_seed(int(seed))
        chosen = torch.randperm(total, generator=g)[:count].sort().values
        windows = all_windows[chosen].contiguous()
    return TokenWindows(
        path, windows, chosen * stride, window=window, labels=labels, num_tokens=n_tokens, total_windows=total
    )


class _Tokenizer:
    """A Hugging Face tokenizer from a local folder: ``encode(texts) -> list of id lists`` (no special
    tokens, no truncation, no padding) and ``eos_id`` (EOS, else SEP, else None)."""

    def __init__(self, where: str, data_path: str) -> None:
        local = os.path.expanduser(where)
        if not os.path.exists(local):
            raise FileNotFoundError(
                f"token_windows({data_path!r}): tokenizer folder {where!r} does not exist; "
                f"give tokenizer: the model folder (one holding tokenizer.json)"
            )
        if os.path.isfile(local):  # the tokenizer.json itself
            folder, file = os.path.dirname(local), local
        else:
            folder, file = local, os.path.join(local, "tokenizer.json")
        self.where = where
        self._tok: Any  # a tokenizers.Tokenizer (tokenizer.json, fast) or a transformers tokenizer
        if os.path.isfile(file):
            try:
                from tokenizers import Tokenizer
            except ImportError:
                raise ImportError(
                    f"token_windows: reading tokenizer {where!r} needs the tokenizers library: {HF_EXTRA}"
                ) from None
            try:
                tok = Tokenizer.from_file(file)
            except Exception as exc:  # noqa: BLE001 - the Rust error, reduced to one line
                raise ValueError(
                    f"token_windows: cannot read tokenizer {file!r} ({_first_line(exc)}); "
                    f"give the model folder's tokenizer.json"
                ) from None
            tok.no_truncation()
            tok.no_padding()
            self._tok, self._fast = tok, True
            special = {}
            for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
                p = os.path.join(folder, name)
                if os.path.isfile(p):
                    with open(p, encoding="utf-8") as f:
                        cfg = json.load(f)
                    special.update({k: v for k, v in cfg.items() if k in ("eos_token", "sep_token") and v})
            self.eos_id = None
            for key in ("eos_token", "sep_token"):
                content = special.get(key)
                content = content.get("content") if isinstance(content, dict) else content
                token_id = tok.token_to_id(content) if isinstance(content, str) else None
                if token_id is not None:
                    self.eos_id = int(token_id)
                    break
        else:
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise ImportError(
                    f"token_windows: tokenizer folder {where!r} has no tokenizer.json and reading it "
                    f"needs transformers: {HF_EXTRA}"
                ) from None
            try:
                tok = AutoTokenizer.from_pretrained(local, local_files_only=True)
            except Exception as exc:  # noqa: BLE001 - transformers' many error types, reduced to one line
                raise ValueError(
                    f"token_windows: cannot load a tokenizer from {where!r} ({_first_line(exc)}); "
                    f"give the model folder that holds tokenizer.json"
                ) from None
            self._tok, self._fast = tok, False
            eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
            self.eos_id = None if eos is None else int(eos)

    def encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self._fast:
            return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        return [list(ids) for ids in self._tok(texts, add_special_tokens=False, truncation=False)["input_ids"]]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _read_table(local: str, path: str):
    """The Arrow table of a Parquet, Arrow IPC (file or stream) or Feather file (pyarrow, no pandas, no pickle)."""
    try:
        import pyarrow as pa
        import pyarrow.feather as feather
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"token_windows: reading {path!r} needs pyarrow: pip install pyarrow") from None
    suffix = os.path.splitext(local)[1].lower()
    try:
        if suffix == ".parquet":
            return pq.read_table(local)
        if suffix == ".feather":
            return feather.read_table(local)
        try:
            with pa.memory_map(local) as src:
                return pa.ipc.open_file(src).read_all()
        except pa.ArrowInvalid:
            with pa.memory_map(local) as src:
                return pa.ipc.open_stream(src).read_all()
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(
            f"token_windows: cannot read {path!r} as {suffix[1:]} ({_first_line(exc)}); "
            f"check that it is a {suffix[1:]} file"
        ) from None


def _table_stream(local: str, path: str, column: str | None, tok: _Tokenizer | None) -> np.ndarray:
    """The int64 token stream of a table column: id lists as they are, strings tokenized; documents joined
    with the tokenizer's EOS id where a tokenizer is given."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = _read_table(local, path)
    names = table.column_names
    if column is None:
        column = names[0] if len(names) == 1 else next((c for c in ("input_ids", "text") if c in names), None)
        if column is None:
            raise ValueError(f"token_windows({path!r}): give column: one of {names}")
    elif column not in names:
        raise ValueError(f"token_windows({path!r}): no column {column!r}; the columns are {names}")
    field = table.schema.field(column)
    arr = table.column(column).combine_chunks() if table.num_rows else pa.array([], field.type)
    # pyarrow.compute generates its functions at import time: pyright cannot see them.
    arr = pc.drop_null(arr)  # pyright: ignore[reportAttributeAccessIssue]
    t = arr.type
    is_list = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    is_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
    is_text = pa.types.is_string(t) or pa.types.is_large_string(t) or is_view(t)
    where = f"token_windows({path!r}): column {column!r}"
    if is_list and pa.types.is_integer(t.value_type):
        values = arr.flatten()
        if values.null_count:
            raise ValueError(f"{where} holds {values.null_count} null token id(s) inside its lists; drop or fill them")
        row_lengths = pc.list_value_length(arr)  # pyright: ignore[reportAttributeAccessIssue]  # as drop_null
        lengths = row_lengths.to_numpy(zero_copy_only=False).astype(np.int64)
        ids = values.to_numpy(zero_copy_only=False)
        if ids.size and (int(ids.min()) < 0 or (ids.dtype == np.uint64 and int(ids.max()) > np.iinfo(np.int64).max)):
            raise ValueError(
                f"{where} holds token ids outside [0, 2**63) (min {int(ids.min())}); "
                f"token ids are non-negative vocabulary indices"
            )
        ids = ids.astype(np.int64)
        if tok is None or tok.eos_id is None:
            return ids
        kept = lengths[lengths > 0]
        return np.insert(ids, np.cumsum(kept)[:-1], tok.eos_id).astype(np.int64)
    if is_text:
        if tok is None:
            raise ValueError(f"{where} holds text: give tokenizer: the model folder (one holding tokenizer.json)")
        docs = [d for d in tok.encode(arr.to_pylist()) if d]
        if not docs:
            return np.zeros(0, dtype=np.int64)
        sep = [] if tok.eos_id is None else [tok.eos_id]
        joined: list[int] = list(docs[0])
        for d in docs[1:]:
            joined += sep
            joined += d
        return np.asarray(joined, dtype=np.int64)
    raise ValueError(
        f"{where} is of type {t}, neither lists of integer token ids nor strings; "
        f"choose another column (the columns are {names})"
    )
