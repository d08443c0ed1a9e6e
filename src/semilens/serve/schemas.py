"""The OpenAI chat-completions wire format, both ways: the request models and their
parsing (a refusal is an ApiError in OpenAI's error format, naming the field), turning a
request into the chat template's messages and images, and the reply's usage and SSE
framing. Nothing here loads a model."""

import base64
import binascii
import io
import json
import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from semilens.config import IngestImagesConfig
from semilens.serve.checkpoint import Completion, GenerationParams

# The ingest stage's decompression-bomb cap, so that serve refuses what ingest refuses.
INGEST_MAX_PIXELS: int = IngestImagesConfig.model_fields["max_pixels"].default


class ApiError(Exception):
    """An answer in OpenAI's error format: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Strict: OpenAI refuses "5" for max_tokens, and silently coercing would hide client bugs.
_STRICT = ConfigDict(strict=True, extra="ignore")


class ImageURL(BaseModel):
    model_config = _STRICT
    url: str
    detail: str | None = None  # accepted; the processor decides the resolution


class ContentPart(BaseModel):
    """One part of a message's content. A single model with a checked ``type``, not a
    tagged union, so that errors point at ``messages[0].content[1].image_url.url``
    rather than at pydantic's union branch names."""

    model_config = _STRICT
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _check(self) -> "ContentPart":
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs `text`")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an image_url part needs `image_url`")
        return self


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant"]
    content: list[ContentPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _string_is_one_text_part(cls, value: Any) -> Any:
        return [{"type": "text", "text": value}] if isinstance(value, str) else value


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of an OpenAI chat-completions body that this server reads; others
    (``user``, ``logprobs``, ``stop``...) are ignored, as most compatible servers do."""

    model_config = _STRICT
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # Accepted but not enforced: a tiny model cannot be constrained to a JSON schema (that
    # needs grammar-guided decoding), so the client validates what comes back.
    response_format: dict[str, Any] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("only n=1 is supported")
        return value


def param_path(loc: tuple[Any, ...]) -> str | None:
    """('messages', 0, 'content', 1, 'image_url', 'url') -> 'messages[0].content[1].image_url.url'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_chat_request(body: bytes, max_depth: int = 64) -> ChatRequest:
    """The request, or ApiError 400 naming the offending field (or the depth limit)."""
    too_deep = f"the request body is nested deeper than max_json_depth {max_depth} (--max-json-depth)"
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})") from exc
    except RecursionError as exc:  # deeper than the interpreter's stack: far past the limit
        raise ApiError(400, too_deep, code="json_too_deep") from exc
    # Checked before validation: pydantic would walk a deep `response_format` recursively.
    if _json_depth(payload) > max_depth:
        raise ApiError(400, too_deep, code="json_too_deep")
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return ChatRequest.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = param_path(first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{param}: {msg}" if param else msg, param=param) from exc


def decode_image(url: str, param: str, max_pixels: int = INGEST_MAX_PIXELS) -> Any:
    """A PIL RGB image from a base64 ``data:`` URL; anything else is refused: this server
    never fetches a URL, so it cannot be made to reach the network or read local files.
    An image whose header claims more than ``max_pixels`` is refused before decoding."""
    from PIL import Image

    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if ":" in url else "relative"
        raise ApiError(
            400,
            f"{param}: only base64 data: URLs are accepted (got a {scheme} URL); the server never fetches anything",
            param=param,
            code="invalid_image_url",
        )
    header, comma, data = url[len("data:") :].partition(",")
    if not comma or not header.endswith(";base64"):
        raise ApiError(
            400,
            f"{param}: not a base64 data URL (expected data:image/png;base64,...)",
            param=param,
            code="invalid_image_url",
        )
    mime = header.removesuffix(";base64")
    if mime and not mime.startswith("image/"):
        raise ApiError(400, f"{param}: media type {mime!r} is not an image", param=param, code="invalid_image_url")
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(
            400, f"{param}: the data is not valid base64 ({exc})", param=param, code="invalid_image_url"
        ) from exc
    too_big = f"{param}: the image header claims {{}} pixels, over max_image_pixels {max_pixels} (--max-image-pixels; ingest's max_pixels); not decoded"
    try:
        # open() reads the header only; Pillow's own bomb warning (over 89 Mpx) is
        # superseded by the cap below, which is checked before anything is decoded.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            picture = Image.open(io.BytesIO(raw))
        with picture:
            if picture.width * picture.height > max_pixels:
                raise ApiError(
                    400,
                    too_big.format(f"{picture.width}x{picture.height} = {picture.width * picture.height}"),
                    param=param,
                    code="image_too_large",
                )
            # convert() as predict does; it forces the full decode, so truncated files fail here.
            return picture.convert("RGB")
    except ApiError:
        raise
    except Image.DecompressionBombError as exc:  # over twice Pillow's own limit: refused in open()
        raise ApiError(
            400,
            too_big.format(f"more than {2 * Image.MAX_IMAGE_PIXELS}") + f" ({exc})",
            param=param,
            code="image_too_large",
        ) from exc
    except Exception as exc:  # noqa: BLE001 - any decoder failure (incl. decompression bombs) is a bad input
        raise ApiError(
            400, f"{param}: not a readable image ({exc.__class__.__name__}: {exc})", param=param, code="invalid_image"
        ) from exc


def chat_messages(
    request: ChatRequest, kind: Literal["text", "vision"], max_images: int = 8, max_pixels: int = INGEST_MAX_PIXELS
) -> tuple[list[dict[str, Any]], list[Any]]:
    """(messages in the chat template's format, the images in order) for a checkpoint kind.

    More than ``max_images`` images are refused before any is decoded; each image is
    refused from its header when it claims more than ``max_pixels``.

    A VLM gets content lists with ``{"type": "image"}`` placeholders, as ``predict``
    builds them; a text model gets each message's text parts joined by newlines (Llama's
    template reads ``content`` as one string), and an image is refused.
    """
    messages: list[dict[str, Any]] = []
    images: list[Any] = []
    n_images = sum(part.type == "image_url" for message in request.messages for part in message.content)
    if kind == "vision" and n_images > max_images:
        raise ApiError(
            400,
            f"messages: {n_images} images, over max_images {max_images} per request (--max-images)",
            param="messages",
            code="too_many_images",
        )
    for i, message in enumerate(request.messages):
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(message.content):
            where = f"messages[{i}].content[{j}]"
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
                continue
            if kind == "text":
                raise ApiError(
                    400,
                    f"{where}: this checkpoint is a text-only model; it cannot read images",
                    param=where,
                    code="images_not_supported",
                )
            if message.role != "user":
                raise ApiError(400, f"{where}: images are accepted in user messages only", param=where)
            images.append(decode_image(part.image_url.url, f"{where}.image_url.url", max_pixels))
            parts.append({"type": "image"})
        if kind == "text":
            messages.append({"role": message.role, "content": "\n".join(p["text"] for p in parts)})
        else:
            messages.append({"role": message.role, "content": parts})
    return messages, images


def generation_params(
    request: ChatRequest, default_max_tokens: int, max_tokens_cap: int | None = None
) -> GenerationParams:
    """The generate() settings of a request; ApiError 400 for max_tokens over the cap."""
    asked = request.max_completion_tokens or request.max_tokens
    if max_tokens_cap is not None and asked is not None and asked > max_tokens_cap:
        param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        raise ApiError(
            400,
            f"{param}: {asked} is over max_tokens_cap {max_tokens_cap} (--max-tokens-cap)",
            param=param,
            code="max_tokens_too_large",
        )
    max_tokens = asked or min(default_max_tokens, max_tokens_cap or default_max_tokens)
    return GenerationParams(
        max_tokens, request.temperature or 0.0, request.top_p or 1.0, request.seed, explicit=asked is not None
    )


def usage(done: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def sse(payload: Any) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"
