"""Retrieval quality of embeddings: precision@k, and the normalised-pixels baseline."""
from __future__ import annotations

import numpy as np

from .faiss_index import exact_neighbours, normalize


def precision_at_k(vectors, labels, k: int = 10, queries=None, query_labels=None) -> float:
    """Mean share of each query's k nearest gallery images (cosine, exact) that share its label.

    Without `queries` every gallery image queries all the others (itself left out).
    """
    x = normalize(vectors)
    labels = np.asarray(labels)
    if len(x) != len(labels):
        raise ValueError(f"{len(x)} vectors but {len(labels)} labels")
    if len(x) <= k:
        raise ValueError(f"precision@{k} needs more than {k} images, got {len(x)}")
    if queries is not None:
        q, query_labels = normalize(queries), np.asarray(query_labels)
        if len(q) != len(query_labels):
            raise ValueError(f"{len(q)} query vectors but {len(query_labels)} labels")
        _, ids = exact_neighbours(q, x, k)
        return float(np.mean(labels[ids] == query_labels[:, None]))
    _, ids = exact_neighbours(x, x, k + 1)
    hits = []
    for i, row in enumerate(ids):
        others = [j for j in row if j != i][:k]  # the image itself (or an exact duplicate ranked first) left out
        hits.append(np.mean(labels[others] == labels[i]))
    return float(np.mean(hits))


def embed_torch(encoder, collection, pre, batch_size: int = 256, progress: bool = False):
    """A torch encoder over every readable image of a collection -> (vectors [N, D], labels [N], skipped)."""
    import torch

    from trainer.data import decode_all
    from trainer.knn import embed
    images, labels, skipped = decode_all(collection, pre, workers=0, progress=progress)
    with torch.inference_mode():
        vectors = embed(encoder, images, pre, torch.device("cpu"), batch_size=batch_size, progress=progress)
    return vectors.numpy(), labels.numpy(), skipped


def pixel_vectors(collection, pre):
    """The baseline without learning: each image through the preprocessing contract (resize, centre
    crop, per-channel normalisation), flattened -> (vectors [N, 3 S S], labels [N])."""
    from trainer.data import decode_all
    images, labels, _ = decode_all(collection, pre, workers=0, progress=False)
    return pre.normalize_tensor(images).flatten(1).numpy(), labels.numpy()
