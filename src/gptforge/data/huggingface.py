"""Hugging Face ``datasets`` as a document source: ``--input hf:NAME[:CONFIG][@SPLIT]``.

Most public pretraining corpora are published on the Hugging Face Hub, and ``datasets`` also
reads local JSON, Parquet, CSV and text files with its packaged loaders. Each row of the chosen
split is one document: its ``--text-field`` column, exactly like a row of a ``.parquet`` input.

The spec::

    hf:NAME[:CONFIG][@SPLIT]       SPLIT defaults to "train"

NAME is a Hub dataset id (``HuggingFaceFW/fineweb-edu``), a packaged loader (``json``,
``parquet``, ``csv``, ``text``, ``arrow``) that reads the files given with ``--hf-data-files``,
or a local directory of data files. CONFIG is the dataset's configuration (a subset, such as
``sample-10BT``).

Sources are always streamed (``load_dataset(..., streaming=True)``). ``prepare`` reads each
source front to back, once per pass, which is the access streaming serves; without it
``datasets`` first writes an Arrow copy of the whole dataset into its cache, which doubles the
disk a many-GB corpus needs and delays the first token by a full conversion. The price is that
every pass (tokenizer training, encoding, a resumed run) reads the data again, over the network
for a Hub dataset: for repeated runs, download it once and give the files as inputs.

A Hub dataset is pinned to the commit it is at when ``prepare`` starts, so the tokenizer pass,
the encoding pass and a resumed run all read the same data, and the manifest says which.

``datasets`` is an optional dependency (``pip install 'gptforge[hf]'``), imported only when an
``hf:`` input is read.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gptforge.data.rendering import RecordTemplate, field_text
from gptforge.errors import GptforgeError

if TYPE_CHECKING:
    from gptforge.data.sources import DocumentShape

log = logging.getLogger(__name__)

HF_PREFIX = "hf:"
DEFAULT_SPLIT = "train"
SYNTAX = "hf:NAME[:CONFIG][@SPLIT]"
# Packaged loaders of ``datasets`` that read local files; without --hf-data-files they would
# silently read whatever lies in the current directory.
FILE_LOADERS = ("json", "parquet", "csv", "text", "arrow")


def is_hf_spec(item: str) -> bool:
    return item.startswith(HF_PREFIX)


@dataclass(frozen=True)
class HFSource:
    """One ``hf:`` input, parsed and checked; :meth:`documents` streams its rows."""

    spec: str
    name: str
    config: str | None
    split: str
    data_files: tuple[Path, ...] = ()
    local_dir: Path | None = None
    revision: str | None = None  # the Hub commit it is pinned to

    def local_files(self) -> list[Path]:
        """The local files this source reads (none for a Hub dataset)."""
        if self.local_dir is not None:
            return _files_under(self.local_dir)
        return list(self.data_files)

    def describe(self) -> dict:
        """What a manifest records about this source; local files with their sha256."""
        from gptforge.data.sources import describe_file

        return {"hf": self.spec, "name": self.name, "config": self.config, "split": self.split,
                "revision": self.revision,
                "files": [describe_file(path) for path in self.local_files()]}

    def check(self, text_field: str, template: RecordTemplate | None = None) -> None:
        """Load it now, so a bad name, config, split or column stops prepare before any work."""
        dataset = self._load()
        columns = dataset.column_names
        if columns is None:
            return
        needed = template.columns(columns) if template is not None else [text_field]
        for column in needed:
            if column not in columns:
                raise self._missing_column(column, columns)

    def documents(self, text_field: str,
                  shape: DocumentShape | None = None) -> Iterator[tuple[str, str]]:
        """Yield ``(label, text)`` per row; null values are skipped, other non-strings refused.

        ``shape`` may render a row through a template instead of taking one column.
        """
        dataset = self._load()
        columns = dataset.column_names  # None when the loader cannot tell before reading
        if shape is not None and shape.template is not None:
            for index, row in enumerate(self._rows(dataset)):
                yield f"{self.spec} row {index}", shape.record_text(row, f"{self.spec} row {index}")
            return
        if columns is not None and text_field not in columns:
            raise self._missing_column(text_field, columns)
        for index, row in enumerate(self._rows(dataset)):
            where = f"{self.spec} row {index}"
            if text_field not in row:
                raise self._missing_column(text_field, list(row), where)
            text = row[text_field]
            if isinstance(text, list):
                text = field_text(text, text_field, where)
            if text is None:
                continue
            if not isinstance(text, str):
                raise GptforgeError(f"{where}: column '{text_field}' holds "
                                    f"{type(text).__name__}, not a string; use --text-field")
            yield where, text

    def rows(self) -> Iterator[dict]:
        """Every row, whole (a dict of columns), streamed; errors name the row."""
        return self._rows(self._load())

    def _load(self):
        datasets = import_datasets()
        path = str(self.local_dir) if self.local_dir is not None else self.name
        kwargs: dict = {"split": self.split, "streaming": True}
        if self.data_files:
            kwargs["data_files"] = [str(p) for p in self.data_files]
        if self.revision:
            kwargs["revision"] = self.revision
        try:
            return datasets.load_dataset(path, self.config, **kwargs)
        except Exception as err:  # datasets raises many types for a bad name, config or split
            raise GptforgeError(f"{self.spec}: cannot load the dataset ({_first_line(err)})") \
                from None

    def _rows(self, dataset) -> Iterator[dict]:
        rows = iter(dataset)
        index = 0
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as err:  # a broken file or a dropped connection, mid-stream
                raise GptforgeError(f"{self.spec} row {index}: cannot read "
                                    f"({_first_line(err)})") from None
            yield row
            index += 1

    def _missing_column(self, field: str, columns: list, where: str | None = None):
        return GptforgeError(f"{where or self.spec}: no column '{field}' (columns: "
                             f"{', '.join(map(str, columns)) or 'none'}); use --text-field")


def parse_hf_spec(spec: str, data_files: list[str] | None = None) -> HFSource:
    """Parse ``hf:NAME[:CONFIG][@SPLIT]``; local files are resolved, a Hub dataset pinned."""
    body = spec[len(HF_PREFIX):]
    if "@" in body:
        body, _, split = body.rpartition("@")
        if not split:
            raise GptforgeError(f"{spec}: empty split after '@' (syntax: {SYNTAX})")
    else:
        split = DEFAULT_SPLIT
    name, _, config = body.partition(":")
    if not name:
        raise GptforgeError(f"{spec}: no dataset name (syntax: {SYNTAX}, e.g. "
                            "hf:HuggingFaceFW/fineweb-edu:sample-10BT@train)")
    import_datasets()  # a missing package is reported before any work starts
    files = tuple(resolve_data_files(data_files or []))
    if name in FILE_LOADERS and not files:
        raise GptforgeError(f"{spec}: the '{name}' loader reads local files; name them with "
                            "--hf-data-files PATH...")
    local = Path(name).expanduser()
    local_dir = local.resolve() if name not in FILE_LOADERS and local.is_dir() else None
    hub = not files and local_dir is None
    return HFSource(spec=spec, name=name, config=config or None, split=split, data_files=files,
                    local_dir=local_dir, revision=pin_revision(name) if hub else None)


def resolve_data_files(items: list[str]) -> list[Path]:
    """The files of ``--hf-data-files``: paths, directories (their files) and globs, in order."""
    files: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            files.extend(_files_under(path))
        elif path.is_file():
            files.append(path.resolve())
        elif set("*?[") & set(item):
            matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
            if not matches:
                raise GptforgeError(f"--hf-data-files: no files match the pattern {item!r}")
            files.extend(Path(m).resolve() for m in matches if Path(m).is_file())
        else:
            raise GptforgeError(f"--hf-data-files: no such file: {item}")
    return list(dict.fromkeys(files))


def _files_under(directory: Path) -> list[Path]:
    return sorted(p.resolve() for p in directory.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def pin_revision(name: str) -> str | None:
    """The commit Hub dataset ``name`` is at now; None offline or when the Hub cannot say."""
    datasets = import_datasets()
    if datasets.config.HF_HUB_OFFLINE:
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(name).sha
    except Exception as err:  # gated, missing, no network: loading reports it, or reads latest
        log.warning("hf:%s: cannot look up its current revision (%s); reading the latest",
                    name, _first_line(err))
        return None


def import_datasets():
    """The ``datasets`` module, or an error saying how to install it."""
    try:
        import datasets
    except ImportError:
        raise GptforgeError("hf: inputs need the Hugging Face datasets package: "
                            "pip install 'gptforge[hf]'") from None
    return datasets


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
