"""Object storage: ``s3://bucket/prefix`` URIs for compiled stores.

Every access to S3 goes through this module, with `obstore <https://developmentseed.org/obstore>`_
(Rust ``object_store``: pooled connections, concurrent requests without the GIL). It was
chosen over tensorstore's ``s3`` kvstore by measurement (README, "Object storage").

- **Configuration** comes from the standard AWS environment variables, read by obstore:
  ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` /
  ``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL`` (``AWS_ENDPOINT_URL_S3`` first). Without
  keys, obstore's chain (web identity, instance metadata) applies.
- **One client per bucket and process**, reused by every request (its connection pool).
- **Retries**: 5xx responses, connection errors and resets and timeouts are retried with
  exponential backoff and jitter (:data:`RETRY`), by obstore.
- **Errors** name the bucket, the key and the cause: :class:`ObjectNotFound` (a
  ``FileNotFoundError``) for a missing object, :class:`BucketError` for a missing bucket or
  refused credentials, :class:`ObjectStoreError` otherwise.
- **Publishing** (:func:`publish`): S3 has no rename, so a store is uploaded under its final
  prefix and becomes a store only when its root ``zarr.json``, uploaded last, exists.

obstore's runtime does not survive ``fork``: a child forked after this process used S3
would hang, so it raises instead (use ``spawn``/``forkserver`` or no worker processes).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import re
import tempfile
import threading
from collections.abc import Coroutine, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

SCHEME = "s3://"
COMMIT = "zarr.json"  # a store's root metadata: uploaded last, the commit marker
REQUESTS = 64  # concurrent requests per process
RETRY = {  # retry_timeout binds: 10 retries of a refused connection take about 2 s
    "max_retries": 100,
    "backoff": {
        "init_backoff": dt.timedelta(milliseconds=100),
        "max_backoff": dt.timedelta(seconds=8),
        "base": 2,
    },
    "retry_timeout": dt.timedelta(minutes=3),
}
_ACCESS_CODES = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken")


class ObjectStoreError(OSError):
    """An S3 request failed (after retries); the message names the bucket, key and cause."""


class ObjectNotFound(ObjectStoreError, FileNotFoundError):
    """No object at the key (the bucket exists)."""


class ObjectChanged(ObjectStoreError):
    """The object was replaced since this process first read it (a store recompiled)."""


class BucketError(ObjectStoreError):
    """The bucket does not exist, or the credentials are refused for it."""


def is_uri(path: object) -> bool:
    """True for an ``s3://`` URI."""
    return str(path).startswith(SCHEME)


@dataclass(frozen=True)
class Uri:
    """A parsed ``s3://bucket/key`` (``key`` without leading or trailing ``/``)."""

    bucket: str
    key: str = ""

    @classmethod
    def parse(cls, uri: str | Uri) -> Uri:
        if isinstance(uri, Uri):
            return uri
        if not is_uri(uri):
            raise ValueError(f"{uri}: not an s3:// URI")
        bucket, _, key = str(uri)[len(SCHEME) :].partition("/")
        if not bucket:
            raise ValueError(f"{uri}: no bucket (expected s3://bucket/prefix)")
        return cls(bucket, key.strip("/"))

    def join(self, *parts: str) -> Uri:
        return Uri(self.bucket, "/".join(p.strip("/") for p in (self.key, *parts) if p))

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}" if self.key else f"{SCHEME}{self.bucket}"


def join(uri: str | Uri, *parts: str) -> str:
    """``uri`` with path parts appended."""
    return str(Uri.parse(uri).join(*parts))


# --- clients and the event loop (one per process) -----------------------------------------

_state: dict = {"pid": None, "clients": {}, "loop": None}
_lock = threading.Lock()


def endpoint() -> str | None:
    """The custom S3 endpoint that the ``AWS_*`` variables name (None: AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _in_this_process() -> None:
    pid = os.getpid()
    if _state["pid"] is None:
        _state["pid"] = pid
    elif _state["pid"] != pid:
        raise ObjectStoreError(
            "S3 access in a process forked after its parent used S3: obstore's runtime does "
            "not survive fork and would hang; read s3:// stores with num_workers=0 or start "
            "workers with the spawn or forkserver method"
        )


_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


def client(bucket: str):
    """The process's ``obstore.store.S3Store`` for ``bucket`` (created on first use, and
    again when the ``AWS_*`` variables change)."""
    from obstore.store import S3Store

    key = (bucket, *(os.environ.get(k) for k in _ENV))
    with _lock:
        _in_this_process()
        store = _state["clients"].get(key)
        if store is None:
            url = endpoint()
            config = (
                {}
                if os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                else {"region": "us-east-1"}
            )
            store = S3Store(
                bucket,
                config=config,
                client_options={"allow_http": bool(url and url.startswith("http://"))},
                retry_config=RETRY,
            )
            _state["clients"][key] = store
    return store


def _loop() -> asyncio.AbstractEventLoop:
    """An event loop on a daemon thread: requests from any thread run concurrently on it."""
    with _lock:
        _in_this_process()
        if _state["loop"] is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="objstore", daemon=True).start()
            _state["loop"] = (loop, asyncio.Semaphore(REQUESTS))
    return _state["loop"]


async def _limited(coro: Coroutine, limit: asyncio.Semaphore):
    async with limit:
        return await coro


def submit(coro: Coroutine) -> Future:
    """Run a coroutine on the process's S3 event loop (at most :data:`REQUESTS` at once)."""
    loop, limit = _loop()
    return asyncio.run_coroutine_threadsafe(_limited(coro, limit), loop)


# --- errors -------------------------------------------------------------------------------


def _cause(e: Exception) -> str:
    """An obstore error in one line: the HTTP status and the S3 error code and message, or
    the error's first line."""
    text = str(e)
    status = re.search(r"status code: (\d{3}[^:]*)", text)
    code = re.search(r"<Code>([^<]+)</Code>", text)
    msg = re.search(r"<Message>([^<]+)</Message>", text)
    if status and code:
        return f"{status.group(1)}: {code.group(1)}" + (f" ({msg.group(1)})" if msg else "")
    return text.split("\n", 1)[0].split("<?xml", 1)[0].rstrip(" :")


def error(e: Exception, uri: Uri, action: str) -> ObjectStoreError:
    """The error to raise for a failed request ``action`` on ``uri``."""
    from obstore.exceptions import (
        PermissionDeniedError,
        PreconditionError,
        UnauthenticatedError,
    )

    text, cause = str(e), _cause(e)
    at = endpoint() or "AWS"
    if "NoSuchBucket" in text:
        return BucketError(
            f"s3://{uri.bucket}: no such bucket at {at} ({action} {uri.key or '/'}): "
            "create the bucket or fix the URI (and AWS_ENDPOINT_URL)"
        )
    if isinstance(e, PermissionDeniedError | UnauthenticatedError) or any(
        c in text for c in _ACCESS_CODES
    ):
        return BucketError(
            f"s3://{uri.bucket}: access denied at {at} ({action} {uri.key or '/'}): "
            f"{cause}; check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) "
            "for this bucket"
        )
    if isinstance(e, PreconditionError):
        return ObjectChanged(
            f"{uri}: replaced since this process first read it (the store was recompiled "
            "or re-uploaded while being read): start again to read the new store"
        )
    if isinstance(e, FileNotFoundError):
        return ObjectNotFound(f"{uri}: no such object in bucket {uri.bucket}")
    return ObjectStoreError(f"{uri}: {action} failed at {at} after retries: {cause}")


async def _guard(coro: Coroutine, uri: Uri, action: str):
    """Await ``coro`` with its errors turned into :func:`error`'s. (obstore's ``*_async``
    calls need a running loop: make them inside coroutines that run on the S3 loop.)"""
    try:
        return await coro
    except ObjectStoreError:
        raise
    except Exception as e:  # obstore raises OSError subclasses and its own BaseError
        raise error(e, uri, action) from None


# --- reads --------------------------------------------------------------------------------


async def get_async(uri: str | Uri, byte_range=None, etag: str | None = None):
    """An object's bytes (an obstore ``Bytes`` buffer) and its ETag.

    Parameters
    ----------
    uri
        The object.
    byte_range
        ``(start, end)`` or ``{"suffix": n}`` (the last ``n`` bytes); None: all of it.
    etag
        When given, the object must still be this version, else :class:`ObjectChanged`.
    """
    import obstore

    u = Uri.parse(uri)
    options = {k: v for k, v in (("range", byte_range), ("if_match", etag)) if v is not None}

    async def get():
        got = await obstore.get_async(client(u.bucket), u.key, options=options)
        return await got.bytes_async(), got.meta.get("e_tag")

    return await _guard(get(), u, "GET" if byte_range is None else "GET range")


def read(uri: str | Uri, start: int | None = None, end: int | None = None) -> bytes:
    """Bytes of an object (``[start, end)`` when given)."""
    byte_range = None if start is None else (start, end)
    return bytes(submit(get_async(uri, byte_range)).result()[0])


def list_objects(uri: str | Uri) -> dict[str, int]:
    """Keys (relative to ``uri``) and sizes of the objects under the prefix ``uri/``."""
    import obstore

    u = Uri.parse(uri)
    prefix = f"{u.key}/" if u.key else ""

    async def listing():
        out = {}
        async for chunk in obstore.list(client(u.bucket), prefix or None):
            for meta in chunk:
                out[meta["path"][len(prefix) :]] = int(meta["size"])
        return out

    return submit(_guard(listing(), u, "LIST")).result()


# --- writes -------------------------------------------------------------------------------


def write(uri: str | Uri, data: bytes | Path) -> None:
    """Upload bytes or a local file (large files in concurrent multipart chunks)."""
    submit(put_async(uri, data)).result()


async def put_async(uri: str | Uri, data: bytes | Path) -> None:
    import obstore

    u = Uri.parse(uri)
    await _guard(obstore.put_async(client(u.bucket), u.key, data), u, "PUT")


def delete(uris: Iterable[str | Uri]) -> None:
    """Delete objects (a missing one is no error)."""
    import obstore

    async def one(u: Uri):
        await _guard(obstore.delete_async(client(u.bucket), u.key), u, "DELETE")

    wait(one(u) for u in map(Uri.parse, uris))


def wait(coros: Iterable[Coroutine]) -> list:
    """Run coroutines concurrently on the S3 loop; their results, in order."""
    futures = [submit(c) for c in coros]
    return [f.result() for f in futures]


def check_writable(uri: str | Uri) -> None:
    """Fail early (:class:`BucketError`) when ``uri``'s bucket is missing or refuses a write."""
    probe = Uri.parse(uri).join(f".write-probe-{os.getpid()}")
    write(probe, b"")
    delete([probe])


def publish(local: Path, uri: str | Uri) -> None:
    """Upload the complete store folder ``local`` as the store ``uri``.

    1. The old store's ``zarr.json`` (if any) is deleted: from then on, ``uri`` is no store.
    2. Every other file is uploaded concurrently, under the final keys.
    3. Objects under ``uri/`` that are not in ``local`` (an older store's, or those a killed
       upload left) are deleted.
    4. ``zarr.json`` is uploaded last: the store exists from this moment, complete.

    A process killed before step 4 leaves objects without ``zarr.json``, which readers refuse
    (:func:`concept.store.read_attrs`); the next compile finds no store there, rebuilds it and
    publishes over them (step 3 removes what it no longer needs).
    """
    u = Uri.parse(uri)
    files = {p.relative_to(local).as_posix(): p for p in local.rglob("*") if p.is_file()}
    if COMMIT not in files:
        raise ValueError(f"{local}: no {COMMIT}: not a store folder")
    delete([u.join(COMMIT)])
    wait(put_async(u.join(k), p) for k, p in files.items() if k != COMMIT)
    delete(u.join(k) for k in list_objects(u) if k not in files)
    write(u.join(COMMIT), files[COMMIT])


def staging(uri: str | Uri) -> Path:
    """A local stand-in path for the store ``uri``: the compiler builds next to it and locks it.

    ``<tmp>/concept-s3/<hash of the URI>/store``; its folder holds the store's lock and
    temporary build, so a compile killed mid-build is cleaned up by the next one.
    """
    digest = hashlib.sha256(str(Uri.parse(uri)).encode()).hexdigest()[:20]
    return Path(tempfile.gettempdir()) / "concept-s3" / digest / "store"


def tensorstore_kvstore(uri: str | Uri) -> dict:
    """A tensorstore ``s3`` kvstore spec of the prefix ``uri``, configured from the same
    ``AWS_*`` variables: the reader of compressed stores and ``obsm`` arrays on S3
    (without this module's ``If-Match`` checks; tensorstore retries on its own)."""
    u = Uri.parse(uri)
    spec = {
        "driver": "s3",
        "bucket": u.bucket,
        "path": f"{u.key}/" if u.key else "",
        "aws_region": os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1",
        "aws_credentials": {"type": "environment"},
    }
    if url := endpoint():
        spec["endpoint"] = url
    return spec


class S3Files:
    """A store's objects under ``s3://bucket/prefix``: the store reader's backend for object
    storage (the methods of the local one in :mod:`concept.store`; ``concurrent``: reads
    return futures, and objects cannot be memory-mapped).

    Each object's ETag is recorded at its first read and every later read of it requires
    it (``If-Match``): a store replaced while being read fails loudly
    (:class:`ObjectChanged`) instead of mixing two versions' bytes.
    """

    concurrent = True

    def __init__(self, uri: str | Uri):
        self.uri = Uri.parse(uri)
        self.root = str(self.uri)
        self._etags: dict[str, str] = {}  # touched only on the S3 loop's thread

    async def _get(self, name: str, byte_range=None):
        data, etag = await get_async(self.uri.join(name), byte_range, self._etags.get(name))
        if etag:
            self._etags.setdefault(name, etag)
        return data

    def text(self, name: str) -> str:
        """A whole small object (metadata); FileNotFoundError when absent."""
        return bytes(submit(self._get(name)).result()).decode()

    def tail(self, name: str, n: int) -> bytes:
        """The last ``n`` bytes of an object; FileNotFoundError when absent."""
        return bytes(submit(self._get(name, {"suffix": n})).result())

    async def _into(self, name: str, offset: int, out: memoryview) -> bool:
        try:
            data = await self._get(name, (offset, offset + len(out)))
        except ObjectNotFound:
            return False
        if len(data) != len(out):
            raise ObjectStoreError(
                f"{self.root}/{name}: short read ({len(data)} of {len(out)} bytes)"
            )
        out[:] = memoryview(data)
        return True

    def read_into(self, name: str, offset: int, out: memoryview) -> Future:
        """Start reading bytes ``[offset, offset + len(out))`` of an object into ``out``.

        Returns a future: True once read, False when the object is absent (the caller fills
        its part); it raises other errors. Requests run concurrently (:data:`REQUESTS`).
        """
        return submit(self._into(name, offset, out))

    def read_many(self, reads: list[tuple[str, int, memoryview]]) -> Future:
        """:meth:`read_into` for many ``(name, offset, out)`` at once (one hand-over to the
        S3 loop for all of them, each request counted in :data:`REQUESTS`): a future of
        their results, in order."""
        loop, limit = _loop()

        async def many() -> list[bool]:
            return await asyncio.gather(*(_limited(self._into(*r), limit) for r in reads))

        return asyncio.run_coroutine_threadsafe(many(), loop)

    def close(self) -> None:
        self._etags.clear()


def download(uri: str | Uri, dest: Path, skip: Iterable[str] = ()) -> None:
    """Copy the objects under the prefix ``uri/`` (but those named in ``skip``) into the
    folder ``dest``, concurrently."""
    u = Uri.parse(uri)
    names = [k for k in list_objects(u) if k not in set(skip)]

    async def one(name: str) -> None:
        data, _ = await get_async(u.join(name))
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    wait(one(n) for n in names)
