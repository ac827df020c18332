"""Create bodies forwarded as they came (multipart uploads and friends) without holding them whole in memory.

A body is read to its end before any quota is reserved: small ones stay in memory, larger ones spill to an
anonymous temporary file. Either way it can be sent again from the start, so a create can fail over to the
next key; each send streams it in chunks.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator
from typing import BinaryIO, Final

from aiohttp import StreamReader

from .errors import GatewayError

IN_MEMORY_BYTES: Final = 1024 * 1024
CHUNK_BYTES: Final = 64 * 1024


def too_large(limit: int) -> GatewayError:
    return GatewayError(413, "body_too_large", f"the request body is over the limit of {limit} bytes")


class SpooledBody:
    """A request body of known size, re-readable from the start any number of times."""

    def __init__(self, content_type: str, in_memory: int = IN_MEMORY_BYTES) -> None:
        self.content_type = content_type
        self.size = 0
        self._in_memory = in_memory
        self._memory = bytearray()
        self._file: BinaryIO | None = None

    @classmethod
    async def read(
        cls,
        stream: StreamReader,
        content_type: str,
        limit: int,
        content_length: int | None = None,
        *,
        in_memory: int = IN_MEMORY_BYTES,
    ) -> SpooledBody:
        """Read `stream` to its end; a 413 as soon as it (or its declared length) passes `limit` bytes."""
        if content_length is not None and content_length > limit:
            raise too_large(limit)
        body = cls(content_type, in_memory)
        try:
            async for chunk in stream.iter_chunked(CHUNK_BYTES):
                if body.size + len(chunk) > limit:
                    raise too_large(limit)
                await body._append(chunk)
        except BaseException:
            body.close()
            raise
        return body

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    async def _append(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._file is None and self.size <= self._in_memory:
            self._memory += chunk
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="agnes-body-")  # noqa: SIM115 - closed by close()
            spilled, self._memory = bytes(self._memory), bytearray()
            await asyncio.to_thread(self._file.write, spilled)
        await asyncio.to_thread(self._file.write, chunk)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body from its first byte, chunk by chunk; each call starts again, so a failed send can be retried."""
        if self._file is None:
            view = memoryview(self._memory)
            for start in range(0, self.size, CHUNK_BYTES):
                yield bytes(view[start : start + CHUNK_BYTES])
            return
        await asyncio.to_thread(self._file.flush)
        fd = self._file.fileno()
        offset = 0
        while offset < self.size:
            chunk = await asyncio.to_thread(os.pread, fd, min(CHUNK_BYTES, self.size - offset), offset)
            if not chunk:
                raise OSError("the spooled request body ended early")
            offset += len(chunk)
            yield chunk

    async def head(self, n: int) -> bytes:
        """The first `n` bytes (fewer if the body is shorter)."""
        return await self._slice(0, min(n, self.size))

    async def tail(self, n: int) -> bytes:
        """The last `n` bytes (fewer if the body is shorter)."""
        n = min(n, self.size)
        return await self._slice(self.size - n, n)

    async def _slice(self, offset: int, n: int) -> bytes:
        if self._file is None:
            return bytes(self._memory[offset : offset + n])
        await asyncio.to_thread(self._file.flush)
        return await asyncio.to_thread(os.pread, self._file.fileno(), n, offset)

    async def read_all(self) -> bytes:
        """The whole body, for the few places that must see it at once (tests, small bodies)."""
        return b"".join([chunk async for chunk in self.chunks()])

    def close(self) -> None:
        """Drop the body; its temporary file, if any, is deleted."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._memory = bytearray()
