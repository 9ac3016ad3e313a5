"""Hostile uploads for tests: gzip bombs."""

from __future__ import annotations

import zlib
from pathlib import Path

MiB = 1024 * 1024


def gzip_bomb(path: Path, unit: bytes, total: int, *, prefix: bytes = b"--\n", suffix: bytes = b"") -> Path:
    """`prefix`, then `unit` repeated to `total` bytes, then `suffix`, gzipped (~1000:1)."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    block = unit * (MiB // len(unit))
    with open(path, "wb") as out:
        out.write(deflate.compress(prefix))
        for _ in range(total // len(block)):
            out.write(deflate.compress(block))
        out.write(deflate.compress(suffix))
        out.write(deflate.flush())
    return path
