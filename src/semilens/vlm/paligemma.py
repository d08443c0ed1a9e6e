"""The tiny PaliGemma-2 preset, and the prefix-LM batches PaliGemma is trained on.

Builds ``PaliGemmaForConditionalGeneration`` (a SigLIP vision tower, a linear projector
and a Gemma-2 text model) with a ``PaliGemmaProcessor`` over a locally trained Gemma-style
BPE (spaces as ``▁``, byte fallback, Gemma's special-token ids). PaliGemma has no chat
template: the processor writes ``<image>``*N ``<bos>`` prompt ``\\n`` as the *prefix*,
which attends to itself in both directions, and the answer as the *suffix*, ending in
``<eos>``, which is causal. ``token_type_ids`` say which is which (0 prefix, 1 suffix),
and only the suffix carries the loss.

semilens trains on multi-turn chats (several questions about one image per row). Here the
first question is the prefix and the suffix holds the first answer ``<eos>``, then each
later question with its ``\\n`` (no loss) and its answer ``<eos>`` (loss). A single-turn
chat therefore encodes exactly as ``processor(text, images, suffix=answer)`` does, which a
test checks, and generation after a history continues the same layout.
"""

from __future__ import annotations

from typing import Any

from semilens.training import IGNORE

MODEL_TYPE = "paligemma"  # config.json's model_type (PaliGemma and PaliGemma-2 alike)
IMAGE_TOKEN = "<image>"
# Gemma's special tokens at Gemma's ids, then the 256 byte-fallback tokens.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
PATCH = 16  # SigLIP's patch side in the tiny preset (real PaliGemma-2: 14 px at 224/448/896)

LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_LORA_TARGETS = r".*vision_tower.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"


def image_side(tiny: Any) -> int:
    """The square input side: the largest multiple of the patch whose square fits max_pixels."""
    return max(2 * PATCH, int(tiny.max_pixels**0.5) // PATCH * PATCH)


def gemma_tokenizer(vocab_size: int, corpus: list[str]) -> Any:
    """A GemmaTokenizer over a BPE learned on ``corpus``: Gemma's normaliser (spaces as
    ``▁``, no prefix space), byte fallback for anything unseen, ``<pad> <eos> <bos> <unk>
    <mask>`` at ids 0-4 as in Gemma."""
    import json

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    # Training only: words start at ▁, so no merge spans two words (SentencePiece's rule).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("▁"), behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(SPECIAL_TOKENS) + len(BYTE_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=["\n"],
        special_tokens=SPECIAL_TOKENS + BYTE_TOKENS,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return GemmaTokenizer(
        vocab=model["vocab"], merges=merges, model_max_length=4096, clean_up_tokenization_spaces=False
    )


def build_tiny(tiny: Any, corpus: list[str]) -> tuple[Any, Any]:
    """(model, processor) of the tiny preset; ``tiny`` is config.TinyVLMConfig.

    The processor adds ``<image>`` and PaliGemma's 1,152 ``<locNNNN>``/``<segNNN>`` tokens
    to the tokenizer, as the real one does; the model's vocabulary covers them all. The
    Gemma-2 stack keeps its soft-capped logits, query scaling and alternating sliding /
    global layers (the window spans the whole sequence at these lengths).
    """
    from transformers import (
        GenerationConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )

    tokenizer = gemma_tokenizer(tiny.vocab_size, corpus)
    side = image_side(tiny)
    n_image_tokens = (side // PATCH) ** 2
    image_processor = SiglipImageProcessor(
        size={"height": side, "width": side},
        image_seq_length=n_image_tokens,
        image_mean=[0.5, 0.5, 0.5],  # SigLIP's normalisation
        image_std=[0.5, 0.5, 0.5],
    )
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    vocab = len(tokenizer)
    head_dim = tiny.hidden_size // tiny.heads
    text_config = dict(
        model_type="gemma2",
        vocab_size=vocab,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.hidden_size * 2,
        num_hidden_layers=tiny.layers,
        num_attention_heads=tiny.heads,
        num_key_value_heads=tiny.kv_heads,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        max_position_embeddings=4096,
        sliding_window=4096,
        hidden_activation="gelu_pytorch_tanh",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision_config = dict(
        model_type="siglip_vision_model",
        hidden_size=tiny.vision_hidden,
        intermediate_size=tiny.vision_hidden * 2,
        num_hidden_layers=tiny.vision_depth,
        num_attention_heads=2,
        image_size=side,
        patch_size=PATCH,
        vision_use_head=False,
    )
    config = PaliGemmaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=processor.image_token_id,
        vocab_size=vocab,
        projection_dim=tiny.hidden_size,
        hidden_size=tiny.hidden_size,
        # untied, like the other presets: the output layer is trained in full beside the
        # adapter (finetune_vlm.lora.modules_to_save) without dragging the inputs along
        tie_word_embeddings=False,
    )
    model = PaliGemmaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    check_token_ids(model.config, processor)
    return model, processor


def check_token_ids(config: Any, processor: Any) -> None:
    """The image token is one token with one id everywhere; the image yields as many
    tokens as the vision tower gives features."""
    tok = processor.tokenizer
    want = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if config.image_token_index != want or processor.image_token_id != want:
        raise ValueError(
            f"config.image_token_index={config.image_token_index}, processor {processor.image_token_id}, tokenizer {want}"
        )
    if processor.image_seq_length != config.text_config.num_image_tokens:
        raise ValueError(
            f"the processor writes {processor.image_seq_length} image tokens, the vision tower gives "
            f"{config.text_config.num_image_tokens}"
        )
    for token in ("<bos>", "<eos>", IMAGE_TOKEN):
        if len(tok(token, add_special_tokens=False)["input_ids"]) != 1:
            raise ValueError(f"{token} is not a single token")


def image_tokens(processor: Any, batch: Any, n_images: int) -> int:
    """Image tokens a batch must hold: ``image_seq_length`` per image."""
    return n_images * processor.image_seq_length


def _text(message: dict[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content.strip()
    return " ".join(c["text"].strip() for c in content if c.get("type") == "text" and c.get("text"))


def _n_images(chat: list[dict[str, Any]]) -> int:
    return sum(1 for m in chat if not isinstance(m["content"], str) for c in m["content"] if c.get("type") == "image")


def _layout(processor: Any, chats: list[list[dict[str, Any]]], images: list[list[Any]]):
    """Per chat (ids, token types, labels), and the pixels: the processor writes the prefix
    (image tokens, ``<bos>``, the first question, ``\\n``) and the pixels; the suffix is
    appended from the tokenizer."""
    tok = processor.tokenizer
    prefixes, suffixes = [], []
    for chat in chats:
        roles = [m["role"] for m in chat if m["role"] != "system"]
        turns = [m for m in chat if m["role"] != "system"]
        if not roles or roles[0] != "user" or any(a == b for a, b in zip(roles, roles[1:])):
            raise ValueError(f"PaliGemma takes alternating user/assistant turns starting with the user, got {roles}")
        prefixes.append(IMAGE_TOKEN * _n_images(chat) + _text(turns[0]))
        ids: list[int] = []
        labels: list[int] = []
        for message in turns[1:]:
            if message["role"] == "assistant":
                answer = tok(_text(message), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                ids += answer
                labels += answer
            else:
                question = tok(_text(message) + "\n", add_special_tokens=False)["input_ids"]
                ids += question
                labels += [IGNORE] * len(question)
        suffixes.append((ids, labels))
    pre = processor(text=prefixes, images=images, padding=True, padding_side="right", return_tensors="pt")
    rows = []
    for i, (ids, labels) in enumerate(suffixes):
        n = int(pre["attention_mask"][i].sum())
        prefix = pre["input_ids"][i, :n].tolist()
        rows.append((prefix + ids, [0] * n + [1] * len(ids), [IGNORE] * n + labels))
    return rows, pre["pixel_values"]


def _pad(rows: list[tuple[list[int], list[int], list[int]]], pad_id: int, side: str) -> dict[str, Any]:
    import torch

    width = max(len(ids) for ids, _, _ in rows)
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "token_type_ids": [], "labels": []}
    for ids, types, labels in rows:
        row = {
            "input_ids": (ids, pad_id),
            "attention_mask": ([1] * len(ids), 0),
            "token_type_ids": (types, 0),
            "labels": (labels, IGNORE),
        }
        for key, (seq, value) in row.items():  # token types pad with 0, as the tokenizer pads them
            gap = [value] * (width - len(ids))
            out[key].append(gap + seq if side == "left" else seq + gap)
    return {k: torch.tensor(v) for k, v in out.items()}


def encode(
    processor: Any, chats: list[list[dict[str, Any]]], images: list[list[Any]], max_length: int | None = None
) -> Any:
    """A training batch: prefix / suffix ``token_type_ids`` and labels on the answers
    (and their ``<eos>``) alone, right-padded. Never truncates: a row longer than
    ``max_length`` is refused, since cutting it would cut an answer or image tokens."""
    from transformers import BatchFeature

    rows, pixels = _layout(processor, chats, images)
    longest = max(len(ids) for ids, _, _ in rows)
    if max_length is not None and longest > max_length:
        raise ValueError(
            f"a PaliGemma row is {longest} tokens, over max_length={max_length}; raise finetune_vlm.trainer.max_length"
        )
    batch = _pad(rows, processor.tokenizer.pad_token_id, "right")
    return BatchFeature({**batch, "pixel_values": pixels})


def prompt_inputs(processor: Any, prompts: list[list[dict[str, Any]]], images: list[list[Any]]) -> Any:
    """Left-padded generation inputs: the first question is the prefix; any earlier
    answers and later questions follow as suffix, as in training."""
    from transformers import BatchFeature

    for p in prompts:
        if p[-1]["role"] != "user":
            raise ValueError("a prompt must end with a user turn")
    rows, pixels = _layout(processor, prompts, images)
    batch = _pad(rows, processor.tokenizer.pad_token_id, "left")
    batch.pop("labels")
    return BatchFeature({**batch, "pixel_values": pixels})
