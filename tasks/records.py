"""Reading a researcher's dataset: JSONL or CSV rows of clean/corrupt prompts, checked row by row.

The schema (one row per pair; README "Your own data"):

- `clean`, `corrupt` (text; `clean_text` / `corrupt_text` are accepted too): the two prompts. They must have
  the same number of tokens, so that every position of one lines up with the other.
- `answer`, `wrong`: what the model should and should not say next: a text (" Mary"), a token id (42) or a
  list of either. Or `answer_ids` / `wrong_ids`: token ids. With logit or probability difference each text
  must be one token. `wrong` is optional for the `kl` metric.
- `metric` (optional, same in every row): `logit_diff` (default: mean answer logit − mean wrong logit),
  `prob_diff` (total answer probability − total wrong probability) or `kl` (minus the KL divergence from
  the clean run's next-token distribution). Every metric reads the last token of each prompt, named `END`.
- `roles` (optional): `{name: marked substring}` (the first occurrence in the clean text, or
  `{"text": ..., "occurrence": k}`), or `{name: [start, end]}` (a character span of the clean text). A role
  becomes the position of the first token of that text in each prompt. In CSV, columns `role:NAME` hold
  substrings and `span:NAME` hold `start:end`.
- `meta` (optional object; in CSV every other column): kept per pair for splitting results.

The `pairs.jsonl` a run writes (token ids, `positions`, `attention_mask`) is itself valid input: its ids and
role positions are used as they are.

`read_records(path)` checks what can be checked without a tokenizer (encoding, JSON, fields, types);
`custom.RecordsTask` checks the rest (token lengths, single-token answers, roles) when it tokenizes.
Every problem is a `DataError` naming the file, the row and the field, and what to do.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

METRICS = ("logit_diff", "prob_diff", "kl")
SCHEMA_HINT = "see the README section 'Your own data' for the file schema"
_KNOWN = {"clean", "corrupt", "clean_text", "corrupt_text", "answer", "wrong", "answer_ids", "wrong_ids", "metric",
          "roles", "meta", "clean_ids", "corrupt_ids", "positions", "attention_mask", "task", "meta_dtypes", "info"}


class DataError(ValueError):
    """A dataset row that cannot be used: names the file, row and field, and says what to do."""

    def __init__(self, source: str, row: int | None, fieldname: str | None, problem: str, fix: str) -> None:
        where = source if row is None else f"{source}, row {row}"
        if fieldname:
            where += f", field {fieldname!r}"
        super().__init__(f"{where}: {problem}. {fix}")
        self.source, self.row, self.field = source, row, fieldname


@dataclass
class Record:
    """One validated row: texts, answers (texts and/or ids), roles, meta; ids when the row carries them."""

    row: int
    clean: str
    corrupt: str
    answer: list[str | int]
    wrong: list[str | int]
    roles: dict[str, object] = field(default_factory=dict)
    meta: dict[str, object] = field(default_factory=dict)
    metric: str | None = None
    clean_ids: list[int] | None = None
    corrupt_ids: list[int] | None = None
    positions: dict[str, int] | None = None


def _answers(value: Any, source: str, row: int, name: str, *, required: bool) -> list[str | int]:
    """An answer field as a list of texts and ids (-1 padding dropped); a `DataError` for anything else."""
    if value is None or value == "" or value == []:
        if required:
            raise DataError(source, row, name, "is missing",
                            f"give the {'correct' if name.startswith('answer') else 'wrong'} next token as text "
                            f"(e.g. \" Mary\") or token id; {SCHEMA_HINT}")
        return []
    items = value if isinstance(value, list) else [value]
    out: list[str | int] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise DataError(source, row, name, f"holds {item!r} ({type(item).__name__})",
                            "write a text, a token id (integer) or a list of them")
        if name.endswith("_ids") and not isinstance(item, int):
            raise DataError(source, row, name, f"holds {item!r}, not a token id", "write integers, or use the text field")
        if isinstance(item, int) and item < 0:
            if not out:  # -1 only pads a saved pairs.jsonl's list after its real ids
                raise DataError(source, row, name, f"holds {item}, out of range: token ids are 0 or more",
                                "use an id of this model's tokenizer (-1 only pads a list after real ids)")
            continue
        if isinstance(item, str) and item == "":
            raise DataError(source, row, name, "is an empty text", "write the token the model should (not) say")
        out.append(item)
    return out


answer_values = _answers  # the public name (counterfactual files read `expected` / `base_answer` with it)


def _int_list(value: Any, source: str, row: int, name: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise DataError(source, row, name, f"must be a list of token ids, got {str(value)[:60]!r}",
                        "write a JSON list of integers, or give the texts only")
    return list(value)


def parse_record(obj: Mapping[str, object], source: str, row: int) -> Record:
    """Check one row (a mapping from JSON or CSV) against the schema and return a `Record`."""
    texts = {}
    for key, alias in (("clean", "clean_text"), ("corrupt", "corrupt_text")):
        value = obj.get(key, obj.get(alias))
        if value is None and f"{key}_ids" in obj:
            value = ""  # token ids given: the text is optional
        elif value is None:
            raise DataError(source, row, key, "is missing",
                            f"every row needs 'clean', 'corrupt', 'answer' and 'wrong'; {SCHEMA_HINT}")
        if not isinstance(value, str) or (not value.strip() and f"{key}_ids" not in obj):
            raise DataError(source, row, key, f"must be a non-empty text, got {value!r}", "write the prompt text")
        texts[key] = value
    metric = obj.get("metric") or None
    if metric is not None and metric not in METRICS:
        raise DataError(source, row, "metric", f"{metric!r} is not a known metric", f"use one of {', '.join(METRICS)}")
    answer_key = "answer" if obj.get("answer") not in (None, "", []) else "answer_ids"
    wrong_key = "wrong" if obj.get("wrong") not in (None, "", []) else "wrong_ids"
    # Whether answers are required depends on the metric, which a caller may still override: RecordsTask checks.
    answer = _answers(obj.get(answer_key), source, row, answer_key if answer_key in obj else "answer", required=False)
    wrong = _answers(obj.get(wrong_key), source, row, wrong_key if wrong_key in obj else "wrong", required=False)
    roles = obj.get("roles") or {}
    if not isinstance(roles, dict):
        raise DataError(source, row, "roles", f"must be an object {{name: substring or [start, end]}}, got {roles!r}",
                        "write e.g. {\"IO\": \" Mary\"}")
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise DataError(source, row, "meta", f"must be an object, got {meta!r}", "write e.g. {\"template\": 3}")
    same = [a for a in answer if a in wrong]
    if same:
        raise DataError(source, row, wrong_key, f"holds {same[0]!r}, which is also the answer",
                        "the wrong token must differ from the answer, or the metric is 0 for every patch")
    rec = Record(row, texts["clean"], texts["corrupt"], answer, wrong, dict(roles), dict(meta), metric)
    if "clean_ids" in obj or "corrupt_ids" in obj:
        clean_ids = _int_list(obj.get("clean_ids"), source, row, "clean_ids")
        corrupt_ids = _int_list(obj.get("corrupt_ids"), source, row, "corrupt_ids")
        mask = obj.get("attention_mask")
        if mask is not None:
            length = sum(_int_list(mask, source, row, "attention_mask"))
            clean_ids, corrupt_ids = clean_ids[:length], corrupt_ids[:length]
        positions = obj.get("positions") or {}
        if not isinstance(positions, dict) or not all(isinstance(v, int) for v in positions.values()):
            raise DataError(source, row, "positions", f"must map role names to token indices, got {positions!r}",
                            "write e.g. {\"END\": 14}")
        rec.clean_ids, rec.corrupt_ids, rec.positions = clean_ids, corrupt_ids, dict(positions)
    return rec


def _lines(data: bytes, source: str) -> list[tuple[int, str]]:
    """Decode a file line by line so that bad UTF-8 is reported with its line number."""
    out = []
    for lineno, raw in enumerate(data.splitlines(), 1):
        try:
            text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(source, lineno, None, f"is not valid UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 4]!r})",
                            "save the file as UTF-8") from exc
        out.append((lineno, text))
    return out


decoded_lines = _lines  # the public name: line-numbered UTF-8 decoding, shared with counterfactual files


def _csv_row(row: Mapping[str, str], source: str, lineno: int) -> dict[str, Any]:
    """A CSV row in schema form: JSON-looking answers parsed, role:/span: columns gathered, the rest as meta."""
    return csv_row(row, source, lineno)


def csv_row(row: Mapping[str, str], source: str, lineno: int, *,
            answers: Sequence[str] = ("answer", "wrong", "answer_ids", "wrong_ids"),
            known: Sequence[str] = tuple(_KNOWN)) -> dict[str, object]:
    """A CSV row as a schema dict: `answers` columns parsed (JSON lists/ids), role:/span: columns gathered into
    `roles`, `known` columns kept, every other column into `meta` (pair files and counterfactual files)."""
    obj: dict[str, Any] = {"roles": {}, "meta": {}}
    for key, value in row.items():
        if key is None:
            raise DataError(source, lineno, None, "has more cells than the header has columns",
                            "quote cells that contain commas")
        value = "" if value is None else value
        if key.startswith("role:"):
            if value:
                obj["roles"][key[5:]] = value
        elif key.startswith("span:"):
            if value:
                try:
                    start, end = (int(v) for v in value.split(":"))
                except ValueError as exc:
                    raise DataError(source, lineno, key, f"{value!r} is not a character span", "write start:end, e.g. 5:10") from exc
                obj["roles"][key[5:]] = [start, end]
        elif key in answers:
            obj[key] = _csv_answer(value)
        elif key in known:
            obj[key] = value
        else:
            obj["meta"][key] = value
    return obj


def _csv_answer(value: str) -> Any:
    stripped = value.strip()
    if stripped.startswith("[") or stripped.lstrip("-").isdigit():
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return value
    return value


def read_records(path: str | os.PathLike[str]) -> list[Record]:
    """Every row of a `.jsonl` or `.csv` dataset, checked; a `DataError` on the first bad one."""
    path = Path(path)
    source = str(path)
    if path.suffix.lower() not in (".jsonl", ".csv", ".json"):
        raise DataError(source, None, None, f"has suffix {path.suffix!r}", "use a .jsonl or .csv file")
    if not path.is_file():
        raise DataError(source, None, None, "does not exist", "check the path")
    lines = _lines(path.read_bytes(), source)
    records: list[Record] = []
    if path.suffix.lower() == ".csv":
        records = _csv_records(lines, source)
    else:
        records = [parse_record(obj, source, lineno)
                   for lineno, obj in jsonl_objects(lines, source, '{"clean": ..., "corrupt": ..., ...}')]
    if not records:
        raise DataError(source, None, None, "holds no rows", f"add one row per clean/corrupt pair; {SCHEMA_HINT}")
    check_consistent(records, source)
    return records


def jsonl_objects(lines: list[tuple[int, str]], source: str, example: str) -> list[tuple[int, dict[str, object]]]:
    """(line number, object) of each non-blank line of a JSONL file; a line that is not a JSON object is an error
    naming it (`example` shows what a row looks like)."""
    objs = []
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(source, lineno, None, f"is not valid JSON ({exc.msg} at column {exc.colno})",
                            "write one JSON object per line") from exc
        if not isinstance(obj, dict):
            raise DataError(source, lineno, None, f"is a JSON {type(obj).__name__}, not an object",
                            f"write one JSON object per line, e.g. {example}")
        objs.append((lineno, obj))
    return objs


def _csv_records(lines: list[tuple[int, str]], source: str) -> list[Record]:
    """The rows of a CSV file, each named by the line it starts on (a quoted cell may span lines); a quote never
    closed is blamed on the line where it opens, not on the end of the file."""
    text = {lineno: line for lineno, line in lines}
    reader = csv.DictReader(io.StringIO("\n".join(line for _, line in lines)))
    end = reader.line_num if reader.fieldnames is not None else 0
    records: list[Record] = []
    for row in reader:
        start = end + 1
        while start < reader.line_num and not text.get(start, "").strip():  # blank lines the reader skipped
            start += 1
        end = reader.line_num
        if not any((v or "").strip() for k, v in row.items() if k is not None):
            continue
        if end > start and _unclosed_quote("\n".join(text[i] for i in range(start, end + 1))):
            raise DataError(source, start, None, f"opens a quote (\") that is never closed (it runs to line {end})",
                            "close the quote, or write a literal quote inside a quoted cell as \"\"")
        records.append(parse_record(_csv_row(row, source, start), source, start))
    return records


def _unclosed_quote(block: str) -> bool:
    """Whether CSV text ends inside a quoted cell."""
    try:
        list(csv.reader(io.StringIO(block), strict=True))
    except csv.Error as exc:
        return "unexpected end of data" in str(exc)
    return False


def check_consistent(records: Sequence[Record], source: str) -> None:
    """Rows of one dataset must agree on the metric and on their role names."""
    metrics = {r.metric for r in records if r.metric}
    if len(metrics) > 1:
        row = next(r.row for r in records if r.metric and r.metric != records[0].metric)
        raise DataError(source, row, "metric", f"rows use several metrics {sorted(metrics)}", "use one metric per file")
    first = records[0]
    roles = list(first.positions or first.roles)
    for rec in records[1:]:
        other = list(rec.positions or rec.roles)
        if sorted(other) != sorted(roles):
            raise DataError(source, rec.row, "positions" if rec.positions else "roles",
                            f"names roles {other}, but row {first.row} names {roles}",
                            "give every row the same roles")
