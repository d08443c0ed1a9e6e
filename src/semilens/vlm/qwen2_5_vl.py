"""The tiny Qwen2.5-VL preset: the real model and processor classes, shrunk.

Builds ``Qwen2_5_VLForConditionalGeneration`` with a small text and vision stack, a
``Qwen2_5_VLProcessor`` with a locally trained byte-level BPE tokenizer carrying Qwen's
special tokens, and the official Qwen2.5-VL chat template. Every token id in the config is
read back from the tokenizer and checked, so the saved folder loads with
``AutoModelForImageTextToText`` / ``AutoProcessor`` exactly like a hub checkpoint.
"""

from __future__ import annotations

from typing import Any

from semilens.tokenizer import train_bpe

MODEL_TYPE = "qwen2_5_vl"  # config.json's model_type, and the family's name in params and dvc.yaml
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Only the language model gets LoRA by default: the vision MLP reuses the names
# gate_proj/up_proj/down_proj, so the pattern is anchored on `language_model`.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_LORA_TARGETS = r".*visual.*\.(qkv|proj|gate_proj|up_proj|down_proj)"


def chat_template() -> str:
    # The official template, byte for byte (TRL ships it): TRL recognises it, and real
    # Qwen2.5-VL checkpoints format prompts identically.
    from trl.chat_template_utils import qwen2_5_vl_chat_template

    return qwen2_5_vl_chat_template


def build_tiny(tiny: Any, corpus: list[str]) -> tuple[Any, Any]:
    """(model, processor) of the tiny preset; ``tiny`` is config.TinyVLMConfig."""
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2Tokenizer,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    vocab, merges = train_bpe(corpus, tiny.vocab_size)
    n = len(vocab)
    for i, token in enumerate(SPECIAL_TOKENS):
        vocab[token] = n + i
    template = chat_template()
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=4096,
        errors="replace",
        clean_up_tokenization_spaces=False,
        chat_template=template,
    )
    # A fresh `size` dict: passing min_pixels/max_pixels in transformers 5.17 mutates the
    # class default, which would leak the tiny limits into every later processor.
    size = {"shortest_edge": tiny.min_pixels, "longest_edge": tiny.max_pixels}
    image_processor = Qwen2VLImageProcessor(size=dict(size), patch_size=14, temporal_patch_size=2, merge_size=2)
    video_processor = Qwen2VLVideoProcessor(size=dict(size), patch_size=14, temporal_patch_size=2, merge_size=2)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=template,
    )

    tid = tokenizer.convert_tokens_to_ids
    head_dim = tiny.hidden_size // tiny.heads
    half = head_dim // 2  # mRoPE sections (temporal, height, width) must sum to head_dim / 2
    t = half // 4
    h = (half - t) // 2
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.hidden_size * 2,
        num_hidden_layers=tiny.layers,
        num_attention_heads=tiny.heads,
        num_key_value_heads=tiny.kv_heads,
        max_position_embeddings=4096,
        max_window_layers=tiny.layers,
        use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [t, h, half - t - h]},
        bos_token_id=None,
        eos_token_id=tid("<|im_end|>"),
        pad_token_id=tid("<|endoftext|>"),
        tie_word_embeddings=False,
    )
    vision_config = dict(
        depth=tiny.vision_depth,
        hidden_size=tiny.vision_hidden,
        intermediate_size=tiny.vision_hidden * 2,
        num_heads=2,
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[tiny.vision_depth - 1],
        out_hidden_size=tiny.hidden_size,
        tokens_per_second=2,
        hidden_act="silu",
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tid("<|im_end|>"), tid("<|endoftext|>")],
        pad_token_id=tid("<|endoftext|>"),
        do_sample=False,
    )
    check_token_ids(model.config, processor)
    return model, processor


def check_token_ids(config: Any, processor: Any) -> None:
    """Every special id the model uses must be what the tokenizer produces, as one token."""
    tok = processor.tokenizer
    pairs = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    for attr, token in pairs.items():
        got = getattr(config, attr)
        want = tok.convert_tokens_to_ids(token)
        if got != want:
            raise ValueError(f"config.{attr}={got} but the tokenizer maps {token} to {want}")
    if processor.image_token_id != config.image_token_id:
        raise ValueError("processor and config disagree on the image token")
    for token in SPECIAL_TOKENS:
        if len(tok(token, add_special_tokens=False)["input_ids"]) != 1:
            raise ValueError(f"{token} is not a single token")


def turn_markers(processor: Any) -> dict[str, Any]:
    """Token ids that open an assistant turn and close any turn (for the loss mask)."""
    tok = processor.tokenizer
    return {
        "start": tok.encode("<|im_start|>assistant\n", add_special_tokens=False),
        "end_id": tok.convert_tokens_to_ids("<|im_end|>"),
        "trailing": tok.encode("\n", add_special_tokens=False),
    }


def image_tokens(processor: Any, batch: Any, n_images: int) -> int:
    """Image tokens a batch must hold: one per merge_size x merge_size group of patches."""
    merge = processor.image_processor.merge_size
    return int(batch["image_grid_thw"].prod(-1).sum()) // merge**2
