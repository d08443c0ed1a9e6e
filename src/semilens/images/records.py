"""The typed records that flow between the image stages.

Each stage writes these as canonical JSON lines; the next stage validates them on read, so
a schema drift fails at the boundary with the field named, not three stages later.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# STEM contrast reads like TEM (transmitted beam), FIB-SEM like SEM (scanned surface). The
# spellings users write ("HAADF-STEM", "fib") are mapped onto these by the sidecar reader
# (semilens.images.metadata.parse_modality).
Modality = Literal["SEM", "TEM", "STEM", "FIB-SEM", "unknown"]
MODALITIES: tuple[str, ...] = ("SEM", "TEM", "STEM", "FIB-SEM", "unknown")


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GroundTruth(Record):
    """Exact truth for a synthetic image, written by synth_images as a sidecar.

    ``sizes_nm`` holds one size per object: the equivalent circular diameter for particles,
    holes, pores and grains; the width for nanowires, fibres, lines and cracks.
    """

    label: str
    modality: Modality
    pixel_size_nm: float
    object_count: int
    sizes_nm: list[float]
    lengths_nm: list[float] | None = None
    orientations_deg: list[float] | None = None
    pitch_nm: float | None = None
    area_fraction: float
    databar_height_px: int
    seed: int


class PanelLabelRecord(Record):
    """A figure's panel label ("a", "(b)", "b1") burned into the image, kept out as an overlay."""

    text: str = Field(description="as tesseract read it")
    box: tuple[int, int, int, int] = Field(description="(left, top, right, bottom) in PNG coordinates")
    confidence: float = Field(description="tesseract's confidence, 0..1")


class ImageRecord(Record):
    """One normalised image (one page of a multi-page file) written by ingest_images."""

    id: str = Field(description="sha256 of the source file (16 hex) plus '-p<page>'")
    source: str = Field(description="path of the source file, relative to the project root")
    origin: Literal["raw", "synthetic"]
    sha256: str
    format: str = Field(description="TIFF, PNG, JPEG, DM3, DM4, ...")
    page: int
    n_pages: int
    original_width: int
    original_height: int
    original_dtype: str
    width: int = Field(description="width of the normalised PNG (after the databar crop)")
    height: int
    crop_box: tuple[int, int, int, int] = Field(description="(left, top, right, bottom) kept")
    databar: str | None = Field(description="how the databar was found, None if none was")
    modality: Modality
    instrument: dict[str, str | float | int] = Field(default_factory=dict)
    pixel_size_nm: float | None
    pixel_size_source: str = Field(
        description="e.g. 'sidecar:json', 'tiff:fei_34682', 'scalebar:ocr', 'databar:hfw', 'none'"
    )
    pixel_size_confidence: float | None = Field(
        None, description="1 for a sidecar or vendor tag; the OCR and geometry score for the image's own"
    )
    pixel_size_check: Literal["agree", "disagree"] | None = Field(
        None,
        description="the vendor tag against the image's own scale bar (or a sidecar against "
        "the tag): within ingest_images.scale_check_tolerance or not; None when only one spoke",
    )
    pixel_size_note: str | None = Field(
        None,
        description="one line: how the image's own scale was read, why it gave none, or a "
        "disagreement with the vendor tag",
    )
    label: str | None
    label_source: Literal["folder", "sidecar", "ground_truth", "none"]
    group: str = Field(description="source micrograph: tiles of one image share it")
    png: str = Field(description="normalised 8-bit PNG, relative to the project root")
    png_sha256: str
    low_information: bool = False
    low_information_reason: str | None = None
    ground_truth: GroundTruth | None = None
    measure_settings: dict[str, str | float | int | bool] = Field(
        default_factory=dict,
        description="measure_images settings the image's sidecars change (JSON over CSV)",
    )
    overlays: list[tuple[int, int, int, int]] = Field(
        default_factory=list,
        description="(left, top, right, bottom) boxes in PNG coordinates holding burned-in "
        "scale bars, their labels and other annotations: not specimen, never measured",
    )
    panel_labels: list[PanelLabelRecord] = Field(
        default_factory=list,
        description="burned-in panel labels found by ingest; their boxes are in overlays",
    )


class QuarantineEntry(Record):
    """An input that could not be used, with a one-line reason."""

    source: str
    reason: str
    sha256: str | None = None
    stage: str


class Measurement(Record):
    """Morphology of one image, written by measure_images.

    Sizes are in pixels and, where the pixel size is known, nm. ``method`` says which
    analysis ran (particles, elongated, periodic_lines, periodic_holes, porous, cracks,
    grains, none) so every number downstream can be traced to how it was made.
    """

    id: str
    method: str
    object_count: int
    eq_diameter_px: list[float] = Field(default_factory=list)
    eq_diameter_nm: list[float] | None = None
    median_size_px: float | None = None
    median_size_nm: float | None = None
    width_px: float | None = Field(None, description="median width of elongated objects/lines")
    width_nm: float | None = None
    length_px: float | None = None
    length_nm: float | None = None
    circularity: float | None = None
    aspect_ratio: float | None = None
    orientation_deg: float | None = Field(None, description="dominant orientation, degrees")
    orientation_spread_deg: float | None = None
    area_fraction: float | None = None
    porosity: float | None = None
    pitch_px: float | None = None
    pitch_nm: float | None = None
    grain_size_px: float | None = None
    grain_size_nm: float | None = None
    crack_fraction: float | None = None
    texture_contrast: float | None = None
    pixel_size_nm: float | None = None
    notes: list[str] = Field(default_factory=list)


class Sidecar(Record):
    """Metadata a user (or synth_images) puts beside an image.

    ``<image>.json`` next to the image, or a row of ``metadata.csv`` in its folder with a
    ``file`` column naming it. Every key is optional; TIFF tags win over the sidecar for
    the pixel size, the sidecar wins over the folder name for the label.
    """

    pixel_size_nm: float | None = Field(None, gt=0)
    label: str | None = None
    modality: Modality | None = None
    group: str | None = None
    instrument: dict[str, str | float | int] = Field(default_factory=dict)
    ground_truth: GroundTruth | None = None
    measure: dict[str, str | float | int | bool] = Field(
        default_factory=dict,
        description="measure_images settings for this image, any key of that params "
        "section (e.g. {'min_object_px': 40} for a noisier detector); in metadata.csv as "
        "'measure.<key>' columns, and a row with file '*' sets them for the whole folder",
    )
