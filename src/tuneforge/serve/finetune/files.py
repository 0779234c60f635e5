"""Training files uploaded through `POST /v1/files` (purpose `fine-tune`), kept in the state directory.

    <state-dir>/files/<file-id>.jsonl    the bytes as uploaded, once every line passed the check
    <state-dir>/files/<file-id>.json     the OpenAI file object (id, bytes, filename, purpose...)

Every line must be a JSON object in OpenAI's chat format, {"messages": [{role, content}, ...]} with
at least one assistant turn, checked by the same converter `tuneforge train` reads it with, so a file
the server accepts is a file training can read. All bad lines are reported at once (up to
`MAX_REPORTED_LINES`), each with its line number. Both files are written atomically, data first: a
file object on disk always has its data beside it.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path

from tuneforge.data.formats import FORMATS, RecordError, convert_record
from tuneforge.data.records import Origin
from tuneforge.errors import DataError, TuneforgeError
from tuneforge.fileio import atomic_write, atomic_write_json

PURPOSE = "fine-tune"
MAX_REPORTED_LINES = 10
FILE_ID = re.compile(r"file-[0-9a-f]{24}")


class InvalidUploadError(DataError):
    """An upload that is not a chat-format JSONL training file; the message lists the bad lines."""


class UnknownFileError(TuneforgeError):
    """No file with that id was uploaded (or it was deleted)."""


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes
    purpose: str


def parse_multipart(body: bytes, content_type: str) -> Upload:
    """The `file` and `purpose` fields of a multipart/form-data body (what the openai client sends).

    The standard library's MIME parser reads the parts; the body is already bounded by the server's
    --max-body-bytes before it gets here."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise InvalidUploadError(f"POST /v1/files takes multipart/form-data with fields 'file' and 'purpose'; "
                                 f"got content-type {content_type!r}")
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts() if message.is_multipart() else []:
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    if "file" not in fields:
        raise InvalidUploadError(f"the upload has no 'file' field (fields: {sorted(fields) or 'none'})")
    purpose = fields.get("purpose", (None, b""))[1].decode("utf-8", "replace").strip()
    filename = fields["file"][0] or "upload.jsonl"
    return Upload(Path(filename).name, fields["file"][1], purpose)


def check_chat_jsonl(data: bytes, filename: str) -> int:
    """Raise InvalidUploadError naming every bad line (up to MAX_REPORTED_LINES); returns the example count."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidUploadError(f"{filename} is not UTF-8 text (byte {error.start}); save it as UTF-8 JSONL") from None
    problems: list[str] = []
    examples = 0
    chat_format = FORMATS["messages"]
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            convert_record(json.loads(line), chat_format, Origin(filename, number))
            examples += 1
        except json.JSONDecodeError as error:
            problems.append(f"line {number}: not valid JSON ({error.msg} at column {error.colno})")
        except RecordError as error:
            problems.append(f"line {number}: {error}")
        except (RecursionError, ValueError):  # nesting too deep for the parser, numbers too long to read
            problems.append(f"line {number}: not valid JSON (nested too deeply or a number too long)")
    if problems:
        more = f"\n(and {len(problems) - MAX_REPORTED_LINES} more bad lines)" if len(problems) > MAX_REPORTED_LINES else ""
        raise InvalidUploadError(
            f"{filename} has {len(problems)} invalid line(s); each line must be a JSON object "
            '{"messages": [{"role": ..., "content": ...}, ...]} with an assistant reply:\n'
            + "\n".join(problems[:MAX_REPORTED_LINES]) + more)
    if examples == 0:
        raise InvalidUploadError(f"{filename} holds no examples; give one chat-format JSON object per line")
    return examples


class FileStore:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def add(self, upload: Upload) -> dict:
        if upload.purpose != PURPOSE:
            raise InvalidUploadError(f"purpose {upload.purpose!r} is not supported; this server takes purpose '{PURPOSE}'")
        check_chat_jsonl(upload.data, upload.filename)
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        record = {"id": file_id, "object": "file", "bytes": len(upload.data), "created_at": int(time.time()),
                  "filename": upload.filename, "purpose": PURPOSE, "status": "processed", "status_details": None}
        atomic_write(self.data_path(file_id), lambda tmp: tmp.write_bytes(upload.data))
        try:
            atomic_write_json(self._record_path(file_id), record)
        except BaseException:
            self.data_path(file_id).unlink(missing_ok=True)
            raise
        return record

    def get(self, file_id: str) -> dict:
        path = self._record_path(self._checked(file_id))
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UnknownFileError(f"no file with id '{file_id}'; upload one with POST /v1/files") from None

    def list(self) -> list[dict]:
        records = []
        for path in sorted(self.directory.glob("file-*.json")):
            try:
                records.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue  # a record being deleted right now
        return sorted(records, key=lambda record: record["created_at"])

    def delete(self, file_id: str) -> dict:
        self.get(file_id)
        with self._lock:
            self._record_path(file_id).unlink(missing_ok=True)
            self.data_path(file_id).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    def data_path(self, file_id: str) -> Path:
        return self.directory / f"{self._checked(file_id)}.jsonl"

    def _record_path(self, file_id: str) -> Path:
        return self.directory / f"{file_id}.json"

    @staticmethod
    def _checked(file_id: str) -> str:
        # Ids become file names: only the exact shape this store hands out is accepted.
        if not isinstance(file_id, str) or not FILE_ID.fullmatch(file_id):
            raise UnknownFileError(f"no file with id {file_id!r}; file ids look like 'file-' followed by 24 hex digits")
        return file_id
