"""Text for language modelling: where documents come from, how they become token ids, and how they
are packed into training windows.

A source (``--data``) is one of

- a text file, or a folder of text files (each file one document);
- a ``.jsonl``/``.json`` or ``.parquet`` file, or a folder of them (a dataset repository laid out on disk);
- a folder written by ``datasets.Dataset.save_to_disk``;
- a Hugging Face hub dataset name, with ``data_config`` and ``split`` (read with ``datasets.load_dataset``,
  streamed with ``streaming=True``);

and a tokenizer (``--tokenizer``) is ``bytes`` (the UTF-8 bytes of the text: vocabulary 256, byte 0 as
end-of-text, as text never holds a NUL) or a Hugging Face tokenizer name or folder (its own end-of-text
token). Documents are packed into one stream with the end-of-text token after each.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sysconfig
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Tokenizer", "TextSource", "load_tokenizer", "documents", "is_dataset_source", "stdlib_files",
           "text_files", "held_out", "DATA_SUFFIXES"]

#: the file types read as datasets (the rest of a folder's files are read as text)
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


@dataclass(frozen=True)
class Tokenizer:
    """Text to token ids: ``encode(text)`` (a sequence of ints), the end-of-text id, the vocabulary size."""

    name: str
    encode: Callable[[str], Sequence[int]]
    eos_id: int
    vocab_size: int


def load_tokenizer(name: str = "bytes") -> Tokenizer:
    """``bytes`` or a Hugging Face tokenizer (hub name or local folder, loaded with ``AutoTokenizer``)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"expected a tokenizer name ('bytes' or a Hugging Face tokenizer), got {name!r}")
    if name == "bytes":
        return Tokenizer("bytes", lambda text: np.frombuffer(text.encode("utf-8"), dtype=np.uint8), 0, 256)
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise ImportError(f'--tokenizer {name} needs Hugging Face transformers: pip install "seqzoo[hf]"') from err
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the tokenizer {name!r} (a hub name or a local folder): {err}") from None
    if tok.eos_token_id is None:
        raise ValueError(f"the tokenizer {name!r} has no end-of-text token to put between documents")

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    return Tokenizer(name, encode, int(tok.eos_token_id), len(tok))


def is_dataset_source(data: str) -> bool:
    """Whether ``data`` is read with ``datasets`` (not as text files): a data file, a folder of data
    files or a ``save_to_disk`` folder, or a name that is no local path (a hub dataset)."""
    path = Path(data).expanduser()
    if path.is_file():
        return path.suffix in DATA_SUFFIXES
    if path.is_dir():
        if _saved_to_disk(path):
            return True
        files = [p for p in path.rglob("*") if p.is_file() and not _hidden(p, path)]
        return bool(files) and all(p.suffix in DATA_SUFFIXES or p.name in ("README.md", ".gitattributes")
                                   for p in files)
    return True


def _hidden(p: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(root).parts)


def _saved_to_disk(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "state.json").is_file() or \
        (path / "dataset_dict.json").is_file()


def documents(data: str, *, data_config: str | None = None, split: str = "train", text_field: str = "text",
              streaming: bool = False, skip: int = 0) -> Iterator[str]:
    """The documents of a dataset source, in order, from document ``skip`` on (see the module docstring)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f'reading the dataset {data!r} needs Hugging Face datasets: pip install "seqzoo[hf]"') \
            from err
    path = Path(data).expanduser()
    one_split = f"{data!r} holds one split, read as 'train'; name a split other than 'train' of a DatasetDict folder or a hub dataset"
    if path.is_dir() and _saved_to_disk(path):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = _split(ds, split, data)
        elif split != "train":
            raise ValueError(f"expected split 'train': {one_split}")
        if streaming:
            ds = ds.to_iterable_dataset()
    elif path.is_file():
        if split != "train":
            raise ValueError(f"expected split 'train': {one_split}")
        builder = DATA_SUFFIXES.get(path.suffix)
        if builder is None:
            raise ValueError(f"expected a {'/'.join(DATA_SUFFIXES)} file, got {str(path)!r}")
        ds = datasets.load_dataset(builder, data_files={split: str(path)}, split=split, streaming=streaming)
    else:
        try:
            ds = datasets.load_dataset(str(path) if path.is_dir() else data, data_config, split=split,
                                       streaming=streaming)
        except (FileNotFoundError, ValueError, ConnectionError) as err:
            raise ValueError(f"cannot load the dataset {data!r} (config {data_config!r}, split {split!r}): {err}") \
                from None
    columns = ds.column_names  # None for a stream whose features are unknown until read
    if columns is not None and text_field not in columns:
        raise ValueError(f"expected a text field {text_field!r} in the dataset {data!r}; its fields: {columns}")
    if skip:
        ds = ds.skip(skip)
    for i, row in enumerate(ds, start=skip):
        text = row.get(text_field)
        if not isinstance(text, str):
            raise ValueError(f"document {i} of {data!r}: expected field {text_field!r} to hold text, got "
                             f"{type(text).__name__}")
        yield text


def _split(ds, split: str, data: str):
    if split not in ds:
        raise ValueError(f"the dataset {data!r} has no split {split!r}; its splits: {sorted(ds)}")
    return ds[split]


def stdlib_files() -> tuple[Path, list[Path]]:
    """The Python standard library's own ``*.py`` files (no site-packages), sorted: (root, files)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")
        )
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def text_files(path: Path) -> tuple[Path, list[Path]]:
    """A text file, or the text files under a folder (no hidden ones, none with a NUL in its first KiB),
    sorted: (root, files)."""
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise ValueError(f"expected --data to be a text file or a folder of text files, got {str(path)!r}")
    files = []
    for p in sorted(path.rglob("*"), key=lambda q: q.relative_to(path).as_posix()):
        if p.is_file() and not _hidden(p, path):
            with open(p, "rb") as f:
                if b"\0" not in f.read(1024):
                    files.append(p)
    if not files:
        raise ValueError(f"expected text files under {str(path)!r}, found none")
    return path, files


def held_out(key: str, every: int) -> bool:
    """Whether the document named ``key`` (a file's path under its root, or a dataset document's index)
    is held out: ``crc32(key) % every == 0``, the lm task's rule."""
    return zlib.crc32(key.encode()) % every == 0


@dataclass(frozen=True)
class TextSource:
    """Where the lm task's documents come from and which of them it holds out: ``data`` (None: the Python
    standard library's sources), and for a dataset its configuration, split, validation split, text field
    and streaming. The documents held out are those with ``crc32(key) % val_every == 0`` (``held_out``), or
    every document of ``eval_split`` when one is named; a single text file holds out its last 10 %.
    ``training()`` and ``held_out()`` give the two sides, so the task trains on one and every evaluation of
    held-out text reads the other."""

    data: str | None = None
    data_config: str | None = None
    data_split: str = "train"
    eval_split: str | None = None
    text_field: str = "text"
    streaming: bool = False
    val_every: int = 20

    @classmethod
    def from_options(cls, options: dict) -> TextSource:
        """The source of a task config (``LMConfig`` fields, or a run's recorded ``task_config``): its
        fields of this class, the defaults for the rest."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names and v is not None})

    def __post_init__(self):
        if self.val_every < 1:
            raise ValueError(f"expected val_every >= 1, got {self.val_every}")
        if self.eval_split is not None and not self.is_dataset:
            raise ValueError(f"expected a dataset with eval_split (text files hold documents out by crc32), got "
                             f"{self.data!r}")
        if self.streaming and not self.is_dataset:
            raise ValueError(f"expected a dataset (jsonl, parquet, save_to_disk folder or hub name) with "
                             f"streaming, got {self.data!r}")

    @functools.cached_property
    def is_dataset(self) -> bool:
        return self.data is not None and is_dataset_source(self.data)

    def _documents(self, split: str, skip: int = 0) -> Iterator[str]:
        return documents(self.data, data_config=self.data_config, split=split, text_field=self.text_field,
                         streaming=self.streaming, skip=skip)

    @functools.cached_property
    def files(self) -> tuple[Path, list[Path]]:
        """(root, files) of a text source, listed once."""
        return stdlib_files() if self.data is None else text_files(Path(self.data).expanduser())

    def training(self, skip: int = 0) -> Iterator[tuple[int, str]]:
        """(index, text) of the documents trained on, in order, from document index ``skip`` on."""
        if self.is_dataset:
            for i, text in enumerate(self._documents(self.data_split, skip), start=skip):
                if self.eval_split is not None or not held_out(str(i), self.val_every):
                    yield i, text
            return
        root, files = self.files
        if len(files) == 1:
            if skip == 0:
                blob = files[0].read_bytes()
                yield 0, blob[: int(len(blob) * 0.9)].decode("utf-8", "replace")
            return
        for i, p in enumerate(files):
            if i >= skip and not held_out(p.relative_to(root).as_posix(), self.val_every):
                yield i, p.read_bytes().decode("utf-8", "replace")

    def held_out(self) -> Iterator[str]:
        """The documents never trained on, in order."""
        if self.eval_split is not None:
            yield from self._documents(self.eval_split)
        elif self.is_dataset:
            for i, text in enumerate(self._documents(self.data_split)):
                if held_out(str(i), self.val_every):
                    yield text
        else:
            root, files = self.files
            if len(files) == 1:
                blob = files[0].read_bytes()
                yield blob[int(len(blob) * 0.9):].decode("utf-8", "replace")
                return
            for p in files:
                if held_out(p.relative_to(root).as_posix(), self.val_every):
                    yield p.read_bytes().decode("utf-8", "replace")
