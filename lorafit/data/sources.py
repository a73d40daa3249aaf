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

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".arrow")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool"}
SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")  # what `datasets.save_to_disk` writes in its folder
REQUIRED_COLUMNS = {"alpaca": ("instruction", "output"), "chat": ("messages",), "completion": ("prompt", "completion"),
                    "text": ("text",)}
OPTIONAL_COLUMNS = {"alpaca": ("input",)}


def _looks_like_path(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.lower().endswith(SUFFIXES)


def is_saved_dataset(path: Path) -> bool:
    """True for a folder written by `datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`)."""
    return path.is_dir() and any((path / m).is_file() for m in SAVED_DATASET_MARKERS)


def _local_files(path: Path) -> list[Path]:
    """The supported files of `path` (itself, or those under a folder, sorted); a saved dataset is its folder."""
    if is_saved_dataset(path):
        return [path]
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


def _arrow_batches(file: Path):
    """Record batches of an Arrow IPC stream (what `datasets` writes) or IPC file."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(file)))
    except pa.ArrowInvalid:
        try:
            f = pa.ipc.open_file(pa.memory_map(str(file)))
        except pa.ArrowInvalid as e:
            raise DataError(f"{file}: not an Arrow stream or file ({e})") from None
        return (f.get_batch(i) for i in range(f.num_record_batches)), f.schema
    return iter(reader), reader.schema


def _read_arrow(file: Path) -> Iterator[tuple[str, Any]]:
    batches, _ = _arrow_batches(file)
    n = 0
    for batch in batches:  # a batch at a time: an Arrow file may be larger than memory
        for item in batch.to_pylist():
            n += 1
            yield f"{file} row {n}", item


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet, ".txt": _read_txt,
            ".arrow": _read_arrow}


def _load_saved(folder: Path, source: DataSource):
    """The split of a `save_to_disk` folder, its columns checked against the format before any row is read."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:  # noqa: BLE001 - a damaged or foreign folder: say what failed
        raise DataError(f"{folder}: looks like a datasets.save_to_disk folder but cannot be loaded: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if source.split not in ds:
            raise DataError(f"{folder}: the saved dataset has no split {source.split!r}; it has {', '.join(ds)} "
                            "(set the source's split:)")
        ds = ds[source.split]
    _check_columns(ds.column_names, source, str(folder))
    return ds


def _check_columns(names: list[str], source: DataSource, where: str) -> None:
    """Refuse a table whose columns cannot give the source's format, naming what it has."""
    required = [source.columns.get(c, c) for c in REQUIRED_COLUMNS.get(source.format, ())]
    if source.format == "chat" and required[0] not in names and "conversations" in names:
        return  # ShareGPT
    missing = [c for c in required if c not in names]
    if missing:
        hint = " (or ShareGPT's conversations)" if source.format == "chat" else ""
        raise DataError(f"{where}: format {source.format} needs column(s) {', '.join(missing)}{hint}; the data has "
                        f"{', '.join(names) or 'no columns'}. Map other names with the source's `columns:`")


def load_hub(source: DataSource, streaming: bool = False):
    import datasets

    try:
        return datasets.load_dataset(source.path, name=source.name, split=source.split,
                                     data_files=source.data_files, streaming=streaming)
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
        if file.is_dir():  # a save_to_disk folder
            for i, item in enumerate(_load_saved(file, source)):
                yield f"{file} row {i + 1}", item
            continue
        if file.suffix.lower() == ".arrow":
            _check_columns(_arrow_batches(file)[1].names, source, str(file))
        yield from _READERS[file.suffix.lower()](file)


def _check_string(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        shown = "null" if value is None else f"{type(value).__name__} {value!r}"[:80]
        raise DataError(f"{where}: column {name!r} must be a string (got {shown})")
    return value


def _tool_calls(value: Any, where: str, i: int) -> list[dict[str, Any]]:
    """OpenAI tool calls, with JSON-string arguments parsed: chat templates render `arguments` as an object."""
    if not isinstance(value, list):
        raise DataError(f"{where}: messages[{i}].tool_calls must be a list of {{type, function: {{name, arguments}}}}")
    out = []
    for j, call in enumerate(value):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataError(f"{where}: messages[{i}].tool_calls[{j}] must be {{type: function, function: {{name, "
                            f"arguments}}}} (got {call!r:.80})")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                raise DataError(f"{where}: messages[{i}].tool_calls[{j}].function.arguments is not valid JSON "
                                f"({args!r:.80})") from None
        out.append({**call, "type": call.get("type", "function"), "function": {**fn, "arguments": args}})
    return out


def _check_message(m: Any, where: str, i: int) -> dict[str, Any]:
    if not isinstance(m, dict) or "role" not in m or ("content" not in m and "tool_calls" not in m):
        raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content' (got {m!r:.80})")
    role = _check_string(m["role"], where, f"messages[{i}].role")
    if role not in ROLES:
        raise DataError(f"{where}: messages[{i}].role is {role!r}; allowed: {', '.join(ROLES)}")
    out: dict[str, Any] = {"role": role}
    if m.get("tool_calls") is not None:  # an assistant turn calling tools may have no (or null) content
        out["tool_calls"] = _tool_calls(m["tool_calls"], where, i)
        out["content"] = "" if m.get("content") is None else _check_string(m["content"], where, f"messages[{i}].content")
    else:
        out["content"] = _check_string(m["content"], where, f"messages[{i}].content")
    for key in ("name", "tool_call_id"):  # the tool's name / the call a tool message answers
        if m.get(key) is not None:
            out[key] = _check_string(m[key], where, f"messages[{i}].{key}")
    return out


def _check_messages(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: column 'messages' must be a non-empty list of {{role, content}} objects")
    return [_check_message(m, where, i) for i, m in enumerate(value)]


def _sharegpt_messages(value: Any, where: str) -> list[dict[str, Any]]:
    """ShareGPT's `conversations: [{from, value}, ...]` as OpenAI-style messages."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: column 'conversations' must be a non-empty list of {{from, value}} objects")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: conversations[{i}] must be an object with 'from' and 'value' (got {turn!r:.80})")
        role = _check_string(turn["from"], where, f"conversations[{i}].from")
        if role not in SHAREGPT_ROLES:
            raise DataError(f"{where}: conversations[{i}].from is {role!r}; allowed: {', '.join(SHAREGPT_ROLES)}")
        out.append({"role": SHAREGPT_ROLES[role], "content": _check_string(turn["value"], where,
                                                                           f"conversations[{i}].value")})
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
    if fmt == "chat" and renamed["messages"] not in item and "conversations" in item:  # ShareGPT
        return {"messages": _sharegpt_messages(item["conversations"], where), "tools": _tools(item, where)}
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
            row["tools"] = _tools(item, where)
        elif want in optional and value is None:
            row[want] = ""
        else:
            row[want] = _check_string(value, where, have)
    return row


def _tools(item: dict[str, Any], where: str) -> list[dict[str, Any]] | None:
    """A chat row's optional `tools` column (function schemas the chat template lists), JSON text accepted."""
    tools = item.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError:
            raise DataError(f"{where}: column 'tools' is not valid JSON ({tools!r:.80})") from None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise DataError(f"{where}: column 'tools' must be a list of function schemas (got {tools!r:.80})")
    return tools or None


def iter_source(source: DataSource, hub=None) -> Iterator[tuple[str, dict[str, Any]]]:
    """The rows of a source one at a time as (where, {column: value}), checked against its format.

    Raises:
        DataError: missing file or folder, malformed JSON, bad columns or values, or no rows at all.
    """
    empty = True
    for where, item in _raw_rows(source, hub):
        empty = False
        yield where, check_row(item, source.format, source.columns, where)
    if empty:
        raise DataError(f"{source.path}: no rows (the data set is empty)")


def read_source(source: DataSource, hub=None) -> list[tuple[str, dict[str, Any]]]:
    """All rows of a source as (where, {column: value}), checked against its format.

    Args:
        source: the source.
        hub: the already loaded hub dataset of a hub source (loaded here when None).

    Raises:
        DataError: missing file or folder, malformed JSON, bad columns or values, or no rows at all.
    """
    return list(iter_source(source, hub))


def count_rows(source: DataSource) -> int | None:
    """Rows in a source without tokenizing it; None for a hub dataset whose size is not known offline.

    Raises:
        DataError: a local path that does not exist or holds no data file.
    """
    files = resolve_source(source)
    if files is None:
        try:
            import datasets

            info = datasets.load_dataset_builder(source.path, name=source.name, data_files=source.data_files).info
            return int(info.splits[source.split].num_examples)
        except Exception:  # noqa: BLE001 - offline, unknown id, no split info: "not counted" is the honest answer
            return None
    total = 0
    for file in files:
        if file.is_dir():
            total += len(_load_saved(file, source))
        elif file.suffix.lower() == ".arrow":
            total += sum(b.num_rows for b in _arrow_batches(file)[0])
        elif file.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(file).metadata.num_rows
        elif file.suffix.lower() in (".jsonl", ".txt"):
            with file.open("rb") as f:
                total += sum(1 for line in f if line.strip())
        else:
            total += sum(1 for _ in _READERS[file.suffix.lower()](file))
    return total
