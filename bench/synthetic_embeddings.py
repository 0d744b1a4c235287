"""Synthetic vectors shaped like CNN embeddings, for the vector-index benchmarks and tests.

Not part of lookalike: data made up to measure indexes on, at sizes no sample
set reaches (bench_search, bench_api, bench_dedupe_speed; tests/test_vectors).
"""

from __future__ import annotations

import math

import numpy as np

CHUNK_ROWS = 1 << 16   # rows generated at a time: bounds the float32 temporaries


def clustered_embeddings(n: int, dim: int = 1280, *, latent_dim: int = 96, copy_share: float = 0.05,
                         seed: int = 0) -> np.ndarray:
    """Synthetic unit float32 vectors shaped like pooled CNN embeddings, for tests and benchmarks.

    Random Gaussian vectors have no neighbourhood structure and make every ANN
    index look bad. These have structure at three scales, in a ``latent_dim``
    subspace: ``n / 100`` overlapping cluster centres of lognormal popularity
    ("categories"), ``n / 20`` sub-centres around them ("products"), items around
    those ("views"), all offsets anisotropic (spectrum ``i^-1/4``). Latents go
    through a random linear layer with a positive bias and a ReLU (non-negative,
    like globally-pooled activations), plus small isotropic noise; a
    ``copy_share`` of items are near-copies of another; rows are L2-normalised.
    At 1280-d and n = 200k the mean cosine similarity to the 1st / 10th / 100th
    neighbour is about 0.88 / 0.83 / 0.65, to a random item about 0.44; the top
    256 principal components hold about 90% of the variance.
    """
    rng = np.random.default_rng(seed)
    n_clusters = max(8, n // 100)
    n_products = max(n_clusters, n // 20)
    projection = (rng.standard_normal((latent_dim, dim)) / math.sqrt(latent_dim)).astype(np.float32)
    bias = rng.uniform(0.0, 0.6, dim).astype(np.float32)
    spectrum = (np.arange(1, latent_dim + 1) ** -0.25).astype(np.float32)
    # Centres close enough that clusters overlap: neighbourhoods are a continuum,
    # not islands an inverted file would find trivially.
    centres = 0.5 * rng.standard_normal((n_clusters, latent_dim)).astype(np.float32)
    popularity = rng.lognormal(0.0, 1.0, n_clusters)
    product_cluster = rng.choice(n_clusters, n_products, p=popularity / popularity.sum())
    products = centres[product_cluster] + 1.2 * spectrum * rng.standard_normal(
        (n_products, latent_dim), dtype=np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, CHUNK_ROWS):
        rows = min(CHUNK_ROWS, n - lo)
        latent = products[rng.integers(0, n_products, rows)] + spectrum * rng.standard_normal(
            (rows, latent_dim), dtype=np.float32)
        features = np.maximum(latent @ projection + bias, 0.0)
        features += 0.05 * rng.standard_normal(features.shape, dtype=np.float32)
        copies = np.flatnonzero(rng.random(rows) < copy_share)
        sources = rng.integers(0, rows, len(copies))
        features[copies] = features[sources] + 0.02 * rng.standard_normal((len(copies), dim), dtype=np.float32)
        features /= np.linalg.norm(features, axis=1, keepdims=True)
        out[lo:lo + rows] = features
    return out
