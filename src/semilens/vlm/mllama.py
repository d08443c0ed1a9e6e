"""The tiny Llama-3.2-Vision preset: the real Mllama model and processor classes, shrunk.

Builds ``MllamaForConditionalGeneration`` (a Llama-3 text model with gated cross-attention
layers that read the image, and a tiled ViT vision encoder with global layers), an
``MllamaProcessor`` with a locally trained Llama-3 byte-level BPE tokenizer, and a chat
template that renders image chats as Llama-3.2-Vision-Instruct does. As in the real
model, the image is one ``<|image|>`` token in the text, with the id right after the
language model's vocabulary (the embedding has room for it, the output layer does not),
and the text attends to the image only through the cross-attention mask the processor
builds from where that token sits. Every id in the config is read back from the
tokenizer and checked.
"""

from __future__ import annotations

from typing import Any

MODEL_TYPE = "mllama"  # config.json's model_type, and the family's name in params and dvc.yaml
IMAGE_TOKEN = "<|image|>"
# After Llama-3's own special tokens: the tool-call tag the processor looks up, then the
# image token, last, so that its id equals the text vocabulary size as in the real model.
EXTRA_SPECIAL_TOKENS = ("<|python_tag|>", IMAGE_TOKEN)

LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_LORA_TARGETS = r".*vision_model.*\.(q_proj|k_proj|v_proj|o_proj|fc1|fc2)"

# Llama-3.2-Vision-Instruct's rendering of a chat with an image (the official template
# then leaves out its system block): a header per turn, the image as <|image|> where the
# message puts it, each turn closed by <|eot_id|>. Text-only chats render the same way.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] | trim }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] | trim }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def tile_size(tiny: Any) -> int:
    """The tile side: the largest multiple of the 14-px patch whose square fits max_pixels."""
    return max(28, int(tiny.max_pixels**0.5) // 14 * 14)


def build_tiny(tiny: Any, corpus: list[str]) -> tuple[Any, Any]:
    """(model, processor) of the tiny preset; ``tiny`` is config.TinyVLMConfig.

    One tile per image (``max_image_tiles: 1``): a micrograph is resized onto a single
    square tile, as a real checkpoint does with a square image. The text stack is
    ``layers`` self-attention layers with one cross-attention layer after the first.
    """
    from transformers import (
        GenerationConfig,
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaImageProcessor,
        MllamaProcessor,
    )

    from semilens.tokenizer import llama3_tokenizer

    tokenizer = llama3_tokenizer(tiny.vocab_size, corpus, EXTRA_SPECIAL_TOKENS, CHAT_TEMPLATE)
    tid = tokenizer.convert_tokens_to_ids
    tile = tile_size(tiny)
    image_processor = MllamaImageProcessor(size={"height": tile, "width": tile}, max_image_tiles=1)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)

    cross_layer = 1 if tiny.layers > 1 else 0
    text_config = dict(
        vocab_size=tid(IMAGE_TOKEN),  # the image token is embedded but never generated
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.hidden_size * 2,
        num_hidden_layers=tiny.layers + 1,
        cross_attention_layers=[cross_layer],
        num_attention_heads=tiny.heads,
        num_key_value_heads=tiny.kv_heads,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tid("<|end_of_text|>"), tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    # the last local layer's output is also handed to the projector, as the real model
    # hands several intermediate layers
    intermediate = [tiny.vision_depth - 1]
    vision_config = dict(
        hidden_size=tiny.vision_hidden,
        intermediate_size=tiny.vision_hidden * 2,
        num_hidden_layers=tiny.vision_depth,
        num_global_layers=1,
        attention_heads=2,
        image_size=tile,
        patch_size=14,
        max_num_tiles=1,
        supported_aspect_ratios=[[1, 1]],
        intermediate_layers_indices=intermediate,
        vision_output_dim=tiny.vision_hidden * (len(intermediate) + 1),
    )
    config = MllamaConfig(vision_config=vision_config, text_config=text_config, image_token_index=tid(IMAGE_TOKEN))
    model = MllamaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tid("<|end_of_text|>"), tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    check_token_ids(model.config, processor)
    return model, processor


def check_token_ids(config: Any, processor: Any) -> None:
    """The image token is one token, the same id in config, processor and tokenizer, and
    sits right after the vocabulary the output layer covers."""
    tok = processor.tokenizer
    want = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if config.image_token_index != want or processor.image_token_id != want:
        raise ValueError(
            f"config.image_token_index={config.image_token_index}, processor {processor.image_token_id}, tokenizer {want}"
        )
    if want != config.text_config.vocab_size:
        raise ValueError(f"{IMAGE_TOKEN} is id {want}, expected the text vocab_size {config.text_config.vocab_size}")
    for token in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", IMAGE_TOKEN):
        if len(tok(token, add_special_tokens=False)["input_ids"]) != 1:
            raise ValueError(f"{token} is not a single token")


def turn_markers(processor: Any) -> dict[str, Any]:
    """Token ids that open an assistant turn and close any turn (for the loss mask)."""
    tok = processor.tokenizer
    return {
        "start": tok.encode("<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False),
        "end_id": tok.convert_tokens_to_ids("<|eot_id|>"),
    }


def image_tokens(processor: Any, batch: Any, n_images: int) -> int:
    """Image tokens a batch must hold: one ``<|image|>`` per image (the image itself goes
    in through cross-attention, not as tokens in the sequence)."""
    return n_images
