"""File contents on disk: one file per id under ``settings.files_dir``, only its owner's
process able to read it (0600 in a 0700 folder).

An upload is parsed straight off the request's byte stream (python-multipart's push parser)
and written in 1 MiB blocks to a temporary name in the same folder, renamed when complete: a
200 MB upload is neither held in memory nor spooled to a temporary file first, and a reader
never sees half a file. Bytes are counted as they arrive, so an upload past
``settings.max_file_bytes`` stops there and leaves nothing behind.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from api.settings import ApiSettings

BLOCK = 1024 * 1024  # bytes per disk write (and per thread hop)
MAX_FIELD_BYTES = 64 * 1024  # a form field other than the file (purpose): small
MAX_FIELDS = 16
FILE_FIELD = "file"


class UploadError(ValueError):
    """The upload cannot be accepted (the API answers 400 naming ``param``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UploadTooLarge(UploadError):
    """The file is larger than ``max_file_bytes``. ``drained`` says whether the rest of the
    request was read (so the client gets the answer, not a reset connection)."""

    def __init__(self, message: str, drained: bool) -> None:
        super().__init__(message, "file")
        self.drained = drained


def make_dirs(settings: ApiSettings) -> None:
    """The data folders, readable by this user only (they hold everyone's inputs and outputs).
    An existing ``data_dir`` keeps its mode (it may be a folder the user chose for more than this)."""
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for folder in (settings.files_dir, settings.batches_dir):
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)


def file_path(settings: ApiSettings, file_id: str) -> Path:
    """Where file ``file_id``'s contents are. Ids are made by the service, but a path must
    never be built from anything with a separator in it."""
    if not file_id or "/" in file_id or "\\" in file_id or file_id.startswith("."):
        raise ValueError(f"not a file id: {file_id!r}")
    return settings.files_dir / file_id


def temp_path(settings: ApiSettings, file_id: str) -> Path:
    """Where an upload is written until it is complete (same folder: the rename is atomic)."""
    return settings.files_dir / f".{file_id}.part"


def remove(settings: ApiSettings, file_id: str) -> None:
    """Delete file ``file_id``'s contents, if any."""
    file_path(settings, file_id).unlink(missing_ok=True)


def clean_filename(name: str) -> str:
    """The name a client gave, without any folders (some browsers send a whole path)."""
    base = PurePosixPath(name.replace("\\", "/")).name.strip()
    return (base or "upload")[:512]


@dataclass
class Upload:
    """A received upload: its contents at ``temp`` until ``commit`` moves them to their place."""

    file_id: str
    temp: Path
    filename: str | None = None
    bytes: int = 0
    fields: dict[str, str] = field(default_factory=dict)

    def commit(self, settings: ApiSettings) -> Path:
        final = file_path(settings, self.file_id)
        os.replace(self.temp, final)
        return final

    def discard(self) -> None:
        self.temp.unlink(missing_ok=True)


@dataclass
class _Part:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    name: str = ""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)


class _Receiver:
    """The parser's callbacks: the file part's bytes go to ``pending`` (written out by the
    async loop in blocks), a field's to memory (small, capped)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.part = _Part()
        self.header_name = bytearray()
        self.header_value = bytearray()
        self.pending = bytearray()
        self.in_file = False
        self.file_seen = False
        self.file_done = False
        self.filename: str | None = None
        self.size = 0
        self.too_large = False
        self.fields: dict[str, str] = {}
        self.ended = False

    def on_part_begin(self) -> None:
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.part.headers.append((bytes(self.header_name).lower(), bytes(self.header_value)))
        self.header_name.clear()
        self.header_value.clear()

    def on_headers_finished(self) -> None:
        disposition = next((v for k, v in self.part.headers if k == b"content-disposition"), b"")
        _, options = parse_options_header(disposition)
        if b"name" not in options:
            raise UploadError("Each multipart part needs a Content-Disposition header with a name.")
        self.part.name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            if self.part.name != FILE_FIELD:
                raise UploadError(f"Unexpected file field {self.part.name!r}: send the file as 'file'.", self.part.name)
            if self.file_seen:
                raise UploadError("Only one file can be uploaded per request.", FILE_FIELD)
            self.file_seen = self.in_file = True
            self.filename = clean_filename(options[b"filename"].decode("utf-8", "replace"))
        elif len(self.fields) >= MAX_FIELDS:
            raise UploadError("Too many form fields.")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.in_file:
            self.size += end - start
            if self.size > self.limit:
                self.too_large = True
            elif not self.too_large:
                self.pending += memoryview(data)[start:end]
        else:
            if len(self.part.data) + end - start > MAX_FIELD_BYTES:
                raise UploadError(f"Form field {self.part.name!r} is too long.", self.part.name)
            self.part.data += memoryview(data)[start:end]

    def on_part_end(self) -> None:
        if self.in_file:
            self.in_file, self.file_done = False, True
        else:
            self.fields[self.part.name] = self.part.data.decode("utf-8", "replace")

    def on_end(self) -> None:
        self.ended = True

    def callbacks(self) -> dict:
        return {name: getattr(self, name) for name in dir(self) if name.startswith("on_")}


def boundary_of(content_type: str | None) -> bytes:
    """The multipart boundary of a Content-Type header; UploadError unless multipart/form-data."""
    kind, params = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        raise UploadError("Expected a multipart/form-data body with the fields 'file' and 'purpose'.")
    return params[b"boundary"]


def _write_all(fd: int, block: bytes) -> None:
    view = memoryview(block)
    while view:
        view = view[os.write(fd, view) :]


async def receive(
    settings: ApiSettings, file_id: str, content_type: str | None, chunks: AsyncIterator[bytes]
) -> Upload:
    """Parse a multipart body from ``chunks`` and write its ``file`` part to a temporary file.

    Args:
        settings: where files go and how large one may be.
        file_id: the id the file will have (names the temporary file).
        content_type: the request's Content-Type header (carries the boundary).
        chunks: the request body as it arrives.

    Returns:
        The upload, its contents at ``Upload.temp``; the caller commits or discards it.

    Raises:
        UploadTooLarge: past ``settings.max_file_bytes`` (the partial file is removed).
        UploadError: not a valid multipart body, or no file in it.
    """
    boundary = boundary_of(content_type)
    receiver = _Receiver(settings.max_file_bytes)
    upload = Upload(file_id=file_id, temp=temp_path(settings, file_id))
    drain_cap = 2 * settings.max_file_bytes + BLOCK  # read (and drop) this much before giving up on a reply
    read = 0
    fd = os.open(upload.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            parser = MultipartParser(boundary, receiver.callbacks())
            async for chunk in chunks:
                read += len(chunk)
                parser.write(chunk)
                if receiver.too_large:
                    if fd >= 0:
                        os.close(fd)
                        fd = -1
                        upload.discard()
                        receiver.pending.clear()
                    if read > drain_cap:
                        raise UploadTooLarge(_too_large(settings), drained=False)
                elif len(receiver.pending) >= BLOCK:
                    block, receiver.pending = bytes(receiver.pending), bytearray()
                    await anyio.to_thread.run_sync(_write_all, fd, block)
            parser.finalize()
        except FormParserError as exc:
            raise UploadError(f"Malformed multipart body: {exc}") from None
        if receiver.too_large:
            raise UploadTooLarge(_too_large(settings), drained=True)
        if not receiver.file_seen:
            raise UploadError("Missing required parameter: 'file'.", FILE_FIELD)
        if not (receiver.file_done and receiver.ended):
            raise UploadError("The multipart body ended before the file did.", FILE_FIELD)
        if receiver.pending:
            await anyio.to_thread.run_sync(_write_all, fd, bytes(receiver.pending))
        os.close(fd)
        fd = -1
    except BaseException:
        if fd >= 0:
            os.close(fd)
        upload.discard()
        raise
    upload.filename, upload.bytes, upload.fields = receiver.filename, receiver.size, receiver.fields
    return upload


def _too_large(settings: ApiSettings) -> str:
    limit = settings.max_file_bytes
    human = f"{limit / 1024**2:.0f} MiB" if limit >= 1024**2 else f"{limit / 1024:.0f} KiB"
    return f"File is too large: the limit is {limit} bytes ({human})."
