"""Sources → checked rows: local files and folders, hub datasets, column renames, and bad-input messages."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit.errors import DataError

if TYPE_CHECKING:
    from lorafit.config import DataSource

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
ROLES = ("system", "user", "assistant", "tool")
REQUIRED_COLUMNS = {"alpaca": ("instruction", "output"), "chat": ("messages",), "completion": ("prompt", "completion"),
                    "text": ("text",)}
OPTIONAL_COLUMNS = {"alpaca": ("input",)}


def _looks_like_path(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.lower().endswith(SUFFIXES)


def _local_files(path: Path) -> list[Path]:
    """The supported files of `path` (itself, or those under a folder, sorted)."""
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise DataError(f"{path}: folder holds no data file ({', '.join(SUFFIXES)})")
    return files


def resolve_source(source: DataSource) -> list[Path] | None:
    """Local files of a source, or None for a hub dataset id. Raises when a path-like source does not exist."""
    path = Path(source.path).expanduser()
    if path.exists():
        return _local_files(path)
    if _looks_like_path(source.path):
        raise DataError(f"{source.path}: no such file or folder (relative paths start at {Path.cwd()})")
    return None


def _read_jsonl(file: Path) -> Iterator[tuple[str, Any]]:
    with file.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{file}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{file}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None


def _read_json(file: Path) -> Iterator[tuple[str, Any]]:
    text = file.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and e.msg == "Extra data":  # JSON Lines saved as .json
            yield from _read_jsonl(file)
            return
        raise DataError(f"{file}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict):  # {"data": [...]}: one list of rows under a single key
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{file}: expected a list of rows (or one key holding one); found an object with keys "
                            f"{', '.join(map(str, data))}")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{file}: expected a list of rows, found {type(data).__name__}")
    for i, item in enumerate(data):
        yield f"{file} row {i + 1}", item


def _read_csv(file: Path) -> Iterator[tuple[str, Any]]:
    with file.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for item in reader:
            yield f"{file}:{reader.line_num}", item


def _read_parquet(file: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    for i, item in enumerate(pq.read_table(file).to_pylist()):
        yield f"{file} row {i + 1}", item


def _read_txt(file: Path) -> Iterator[tuple[str, Any]]:
    with file.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield f"{file}:{n}", {"text": line.rstrip("\n")}


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet, ".txt": _read_txt}


def load_hub(source: DataSource):
    import datasets

    try:
        return datasets.load_dataset(source.path, split=source.split)
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot use this id"; say why
        raise DataError(f"{source.path}: not a local file or folder, and loading it as a hub dataset "
                        f"(split {source.split!r}) failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                        ) from None


def _raw_rows(source: DataSource, hub=None) -> Iterator[tuple[str, Any]]:
    files = resolve_source(source) if hub is None else None
    if files is None:
        for i, item in enumerate(hub if hub is not None else load_hub(source)):
            yield f"{source.path}[{source.split}] row {i + 1}", item
        return
    for file in files:
        yield from _READERS[file.suffix.lower()](file)


def _check_string(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        shown = "null" if value is None else f"{type(value).__name__} {value!r}"[:80]
        raise DataError(f"{where}: column {name!r} must be a string (got {shown})")
    return value


def _check_messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: column 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content' (got {m!r:.80})")
        role = _check_string(m["role"], where, f"messages[{i}].role")
        if role not in ROLES:
            raise DataError(f"{where}: messages[{i}].role is {role!r}; allowed: {', '.join(ROLES)}")
        out.append({"role": role, "content": _check_string(m["content"], where, f"messages[{i}].content")})
    return out


def check_row(item: Any, fmt: str, columns: dict[str, str], where: str) -> dict[str, Any]:
    """One raw row as the columns its format needs: renamed, type-checked, optional ones filled in.

    Args:
        item: the row as read (a dict for every supported file type).
        fmt: the source's format.
        columns: the source's renames, {expected_name: name_in_data}.
        where: "file:line" (or "file row N") for messages.

    Returns:
        {column: value} with exactly the format's columns.

    Raises:
        DataError: unknown format, a missing column (expected and found names listed), or a value of the wrong type.
    """
    if fmt not in REQUIRED_COLUMNS:
        raise DataError(f"{where}: unknown format {fmt!r}; use one of {', '.join(REQUIRED_COLUMNS)}")
    if not isinstance(item, dict):
        raise DataError(f"{where}: a row must be an object with named columns (got {type(item).__name__})")
    required, optional = REQUIRED_COLUMNS[fmt], OPTIONAL_COLUMNS.get(fmt, ())
    renamed = {want: columns.get(want, want) for want in required + optional}
    missing = [f"{want}" + (f" (as {have!r})" if have != want else "") for want, have in renamed.items()
               if want in required and have not in item]
    if missing:
        raise DataError(f"{where}: format {fmt} needs column(s) {', '.join(missing)}; found: "
                        f"{', '.join(map(str, item)) or 'none'}. Map other names with the source's `columns:` "
                        f"(e.g. columns: {{{required[0]}: your_column}})")
    row = {}
    for want, have in renamed.items():
        value = item.get(have)
        if want == "messages":
            row[want] = _check_messages(value, where)
        elif want in optional and value is None:
            row[want] = ""
        else:
            row[want] = _check_string(value, where, have)
    return row


def read_source(source: DataSource, hub=None) -> list[tuple[str, dict[str, Any]]]:
    """All rows of a source as (where, {column: value}), checked against its format.

    Args:
        source: the source.
        hub: the already loaded hub dataset of a hub source (loaded here when None).

    Raises:
        DataError: missing file or folder, malformed JSON, bad columns or values, or no rows at all.
    """
    rows = [(where, check_row(item, source.format, source.columns, where)) for where, item in _raw_rows(source, hub)]
    if not rows:
        raise DataError(f"{source.path}: no rows (the data set is empty)")
    return rows


def count_rows(source: DataSource) -> int | None:
    """Rows in a source without tokenizing it; None for a hub dataset whose size is not known offline.

    Raises:
        DataError: a local path that does not exist or holds no data file.
    """
    files = resolve_source(source)
    if files is None:
        try:
            import datasets

            info = datasets.load_dataset_builder(source.path).info
            return int(info.splits[source.split].num_examples)
        except Exception:  # noqa: BLE001 - offline, unknown id, no split info: "not counted" is the honest answer
            return None
    total = 0
    for file in files:
        if file.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(file).metadata.num_rows
        elif file.suffix.lower() in (".jsonl", ".txt"):
            with file.open("rb") as f:
                total += sum(1 for line in f if line.strip())
        else:
            total += sum(1 for _ in _READERS[file.suffix.lower()](file))
    return total
