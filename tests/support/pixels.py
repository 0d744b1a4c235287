"""Huge images in small files, written without ever holding their pixels."""

from __future__ import annotations

import struct
import zlib


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def blank_png(width: int, height: int, *, rgb: bool) -> bytes:
    """A valid all-black PNG, 8-bit RGB or 1-bit grey, compressed row block by row block.

    Zeros compress about 1000:1, so 81 megapixels of RGB are about 240 KB.
    """
    row = bytes(1 + (3 * width if rgb else (width + 7) // 8))  # filter byte + pixels
    compressor = zlib.compressobj(9)
    rows_per_block = max(1, (1 << 20) // len(row))
    parts = [compressor.compress(row * min(rows_per_block, height - start))
             for start in range(0, height, rows_per_block)]
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, *((8, 2) if rgb else (1, 0)), 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b""))


def blank_rgb_png(width: int, height: int) -> bytes:
    return blank_png(width, height, rgb=True)
