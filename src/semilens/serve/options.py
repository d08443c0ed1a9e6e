"""ServeOptions: everything ``semilens serve`` can be told besides the folder, host and
port. Every limit is a field whose refusal (a 4xx) names it."""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from semilens.serve.faults import FAULT_KINDS
from semilens.serve.schemas import INGEST_MAX_PIXELS


class ServeOptions(BaseModel):
    """Everything ``semilens serve`` can be told besides the folder, host and port."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str | None = Field(
        None, min_length=1, description="the model id clients send; default: the folder path as given"
    )
    api_key: SecretStr | None = Field(
        None, description="require `Authorization: Bearer <key>`; a SecretStr so it never shows in a repr or log"
    )
    max_request_bytes: int = Field(
        20_000_000, ge=1, description="larger request bodies get 413 (20 MB holds a few base64 micrographs)"
    )
    default_max_tokens: int = Field(
        256, ge=1, description="when a request names neither max_tokens nor max_completion_tokens"
    )
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; None leaves torch's default")
    latency_ms: float = Field(
        0.0, ge=0, description="added to every /v1 request before it is answered (asyncio.sleep: other requests go on)"
    )
    fault_rate: float = Field(
        0.0, ge=0, le=1, description="probability that a valid chat request gets an injected fault"
    )
    fault_kinds: tuple[str, ...] = Field(
        FAULT_KINDS, description="which faults to draw from: 429, 500, timeout, malformed"
    )
    fault_seed: int = Field(0, description="seed of the fault RNG: the same request order gives the same faults")
    fault_hold_s: float = Field(
        30.0, ge=0, description="how long a `timeout` fault holds the request before answering normally"
    )
    fault_retry_after_s: int = Field(1, ge=0, description="the Retry-After header (seconds) of an injected 429")
    # Limits: each refusal is a 4xx whose message names the setting, so a client (or its
    # operator) knows which knob it hit. The defaults keep one 2-core box responsive.
    max_tokens_cap: int = Field(
        4096,
        ge=1,
        description="a request asking for more max_tokens gets 400; higher: longer replies, longer holds of the model",
    )
    context_tokens: int | None = Field(
        None, ge=2, description="prompt tokens + max_tokens must fit; None: the model's max_position_embeddings"
    )
    max_image_pixels: int = Field(
        INGEST_MAX_PIXELS,
        ge=1,
        description="images whose header claims more pixels get 400, undecoded (ingest_images.max_pixels by default)",
    )
    max_images: int = Field(8, ge=0, description="images per request; more get 400 before any is decoded")
    max_json_depth: int = Field(
        64, ge=2, description="deeper-nested request bodies get 400 (a chat body needs about 6)"
    )
    # Below anyio's 40 worker threads, so waiting generations never starve image decoding.
    max_in_flight: int = Field(
        32, ge=1, description="chat requests admitted (queued or generating); more get 429 with Retry-After"
    )
    busy_retry_after_s: int = Field(1, ge=0, description="the Retry-After header (seconds) of a 429 for a full queue")
    # Batching: on 2 CPU threads a batch of 16 tiny-model replies costs little more than
    # one, so waiting a few ms for company pays; a larger batch holds more activations.
    max_batch_size: int = Field(16, ge=1, description="greedy requests answered by one generate call; 1: one at a time")
    batch_window_ms: float = Field(
        5.0, ge=0, description="how long the oldest waiting request waits for others to share its batch"
    )

    @field_validator("fault_kinds", mode="before")
    @classmethod
    def _split_kinds(cls, value: Any) -> Any:
        # The CLI passes "429,timeout"; Python callers may pass a list.
        if isinstance(value, str):
            value = [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("fault_kinds")
    @classmethod
    def _check_kinds(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [k for k in value if k not in FAULT_KINDS]
        if unknown:
            raise ValueError(f"unknown fault kind(s) {', '.join(unknown)}; known: {', '.join(FAULT_KINDS)}")
        if not value:
            raise ValueError(f"give at least one fault kind of {', '.join(FAULT_KINDS)}")
        return tuple(dict.fromkeys(value))  # de-duplicated: a repeated kind must not weigh more
