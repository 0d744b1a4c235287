"""Hamming distance between perceptual hashes: the one implementation.

On hex text (what the database stores, and what the SQL ``hamming(a, b)``
function compares: SQLite registers :func:`hamming`, PostgreSQL's function is
the same rule in SQL) and on uint64 hash words (what dedupe and the
near-duplicate search compare in bulk).
"""

from __future__ import annotations

import numpy as np

from .errors import BadInput


def hamming(a: str, b: str) -> int:
    """Bits that differ between two hex hashes, the shorter left-padded with zeros.

    The one Hamming distance on hex: the SQL ``hamming(a, b)`` function (SQLite's
    registered one; PostgreSQL's is the same rule in SQL) and :func:`hamming_hex`
    are this.
    """
    return (int(a or "0", 16) ^ int(b or "0", 16)).bit_count()


def hamming_hex(a: str, b: str) -> int:
    """Number of differing bits between two hex hashes of the same kind and size.

    Not for ``dhash_rowcol`` at odd sizes, whose unpadded hex does not keep
    bits in place; compare ``HashValue.value`` there.
    """
    if len(a) != len(b):
        raise BadInput(f"hashes of different lengths: {len(a)} and {len(b)} hex digits")
    return hamming(a, b)


def popcount_rows(xor: np.ndarray, dtype=np.int64) -> np.ndarray:
    """Set bits per row of XORed hash words: uint64 (n,) for 64-bit hashes, (..., words) for longer ones."""
    bits = np.bitwise_count(xor)
    if bits.ndim > 1:
        bits = bits[..., 0] if bits.shape[-1] == 1 else bits.sum(axis=-1, dtype=dtype)
    return bits.astype(dtype, copy=False)


def hamming_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The Hamming distance row by row between two hash matrices (see :func:`popcount_rows`)."""
    return popcount_rows(a ^ b)
