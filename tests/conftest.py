"""Shared test fixtures: the real-data folder, and a Config whose paths point into tmp_path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from semilens.config import Config

REALDATA = (Path(__file__).parents[1] / ".." / "shared" / "realdata").resolve()


@pytest.fixture(scope="session")
def realdata() -> Path:
    """``../shared/realdata`` (used by path, never copied). Missing data is a failure:
    a skipped real-data test would hide that the pipeline was never checked on real files."""
    if not REALDATA.is_dir():
        pytest.fail(
            f"real data not found at {REALDATA} (expected ../shared/realdata beside the "
            "project root; see shared/realdata/README.md)"
        )
    return REALDATA


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., Config]:
    """``make_cfg(raw=..., synthetic=..., **ingest_images_overrides)`` -> Config.

    Outputs, cache and logs live under tmp_path; the input folders default to empty ones.
    """

    def make(
        raw: Path | None = None, synthetic: Path | None = None, **ingest: Any
    ) -> Config:
        return Config.model_validate(
            {
                "paths": {
                    "raw_images": str(raw or tmp_path / "raw"),
                    "synthetic_images": str(synthetic or tmp_path / "synthetic"),
                    "interim_images": str(tmp_path / "out" / "images"),
                    "cache": str(tmp_path / "cache"),
                    "logs": str(tmp_path / "logs"),
                },
                "ingest_images": ingest,
            }
        )

    return make


KNOWLEDGE = Path(__file__).parents[1] / "knowledge"


def text_config(tmp: Path, **sections: Any) -> Config:
    """A Config for the text path: the project's knowledge base, everything else under ``tmp``."""
    names = ("raw_pdfs", "synthetic_pdfs", "pages", "markdown", "tags", "instructions", "models", "metrics", "cache", "logs")
    return Config.model_validate(
        {"paths": {"knowledge": str(KNOWLEDGE), **{n: str(tmp / n) for n in names}}, **sections}
    )
