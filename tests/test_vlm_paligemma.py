"""PaliGemma's prefix-LM batches: what users of other tools trip over.

The prompt (image tokens, ``<bos>``, question, ``\\n``) is the prefix: token type 0,
attended in both directions, no loss. The answer and its ``<eos>`` are the suffix: token
type 1, causal, the only labels. A single-turn chat must encode exactly as the processor's
own ``suffix=`` path does; later turns of a multi-turn chat stay in the suffix with their
questions unlabelled.
"""

from __future__ import annotations

import random

import pytest
import torch

from semilens.config import TinyVLMConfig
from semilens.tokenizer import general_corpus
from semilens.vlm import generic_task, paligemma
from semilens.vlm.labels import IGNORE


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, processor = paligemma.build_tiny(TinyVLMConfig(vocab_size=600), general_corpus() + generic_task.phrasings())
    return model.eval(), processor


def _samples(n: int, seed: int = 0) -> list[generic_task.Sample]:
    rnd = random.Random(seed)
    return [generic_task.sample(rnd, 112) for _ in range(n)]


def test_single_turn_encodes_as_the_processor_suffix_path(tiny):
    _, processor = tiny
    samples = _samples(3)
    chats = [generic_task.conversation(s, turns=1) for s in samples]
    images = [[s.image] for s in samples]
    ours = paligemma.encode(processor, chats, images)
    theirs = processor(
        text=[paligemma.IMAGE_TOKEN + s.qa[0][0] for s in samples],
        images=images,
        suffix=[s.qa[0][1] for s in samples],
        padding=True,
        padding_side="right",
        return_tensors="pt",
    )
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels", "pixel_values"):
        assert torch.equal(torch.as_tensor(ours[key]), torch.as_tensor(theirs[key])), key


def test_prefix_and_suffix_types_and_labels_in_a_multi_turn_chat(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    sample = _samples(1, seed=3)[0]
    assert len(sample.qa) >= 3
    batch = paligemma.encode(processor, [generic_task.conversation(sample)], [[sample.image]])
    ids, types, labels = batch["input_ids"][0], batch["token_type_ids"][0], batch["labels"][0]
    n_prefix = int((types == 0).sum())
    # the prefix: every image token, one <bos>, the first question and "\n"; no loss
    prefix = tok.decode(ids[:n_prefix])
    assert prefix == paligemma.IMAGE_TOKEN * processor.image_seq_length + "<bos>" + sample.qa[0][0] + "\n"
    assert (types[:n_prefix] == 0).all() and (types[n_prefix:] == 1).all()
    assert (labels[:n_prefix] == IGNORE).all()
    # the suffix: answers and their <eos> supervised, later questions not
    supervised = tok.decode(ids[labels != IGNORE])
    assert supervised == "".join(a + "<eos>" for _, a in sample.qa)
    unsupervised_suffix = tok.decode(ids[n_prefix:][labels[n_prefix:] == IGNORE])
    assert unsupervised_suffix == "".join(q + "\n" for q, _ in sample.qa[1:])


def test_a_row_over_max_length_is_refused_not_cut(tiny):
    _, processor = tiny
    sample = _samples(1)[0]
    batch = paligemma.encode(processor, [generic_task.conversation(sample)], [[sample.image]])
    n = int(batch["input_ids"].shape[1])
    assert paligemma.encode(processor, [generic_task.conversation(sample)], [[sample.image]], max_length=n) is not None
    with pytest.raises(ValueError, match="over max_length"):
        paligemma.encode(processor, [generic_task.conversation(sample)], [[sample.image]], max_length=n - 1)


def test_prompts_are_left_padded_prefixes_and_continue_a_history(tiny):
    _, processor = tiny
    samples = _samples(2, seed=5)
    prompts = [generic_task.conversation(samples[0], turns=1)[:1], generic_task.conversation(samples[1], turns=2)[:3]]
    images = [[s.image] for s in samples]
    inputs = paligemma.prompt_inputs(processor, prompts, images)
    assert "labels" not in inputs
    # the single-turn prompt is exactly the processor's, left-padded
    alone = processor(text=[paligemma.IMAGE_TOKEN + samples[0].qa[0][0]], images=images[:1], return_tensors="pt")
    n = alone["input_ids"].shape[1]
    assert torch.equal(inputs["input_ids"][0, -n:], alone["input_ids"][0])
    assert (inputs["attention_mask"][0, :-n] == 0).all() and (inputs["token_type_ids"][0] == 0).all()
    # the two-turn prompt: the first answer and the second question follow as suffix
    tok = processor.tokenizer
    tail = tok.decode(inputs["input_ids"][1][inputs["token_type_ids"][1] == 1])
    assert tail == samples[1].qa[0][1] + "<eos>" + samples[1].qa[1][0] + "\n"
    with pytest.raises(ValueError, match="user turn"):
        paligemma.prompt_inputs(processor, [generic_task.conversation(samples[0], turns=1)], images[:1])


def test_the_prefix_attends_both_ways_and_the_suffix_causally(tiny):
    model, processor = tiny
    sample = _samples(1, seed=7)[0]
    batch = paligemma.encode(processor, [generic_task.conversation(sample, turns=2)], [[sample.image]])
    batch.pop("labels")
    n_prefix = int((batch["token_type_ids"][0] == 0).sum())
    with torch.no_grad():
        logits = model(**batch).logits[0]
        # a changed last prefix token reaches the earlier prefix positions (bidirectional) ...
        changed = {k: v.clone() for k, v in batch.items()}
        changed["input_ids"][0, n_prefix - 2] = processor.tokenizer.convert_tokens_to_ids("<unk>")
        after = model(**changed).logits[0]
        assert not torch.allclose(logits[: n_prefix - 2], after[: n_prefix - 2], atol=1e-6)
        # ... a changed last suffix token reaches nothing before it (causal)
        changed = {k: v.clone() for k, v in batch.items()}
        changed["input_ids"][0, -1] = processor.tokenizer.convert_tokens_to_ids("<unk>")
        after = model(**changed).logits[0]
        assert torch.allclose(logits[:-1], after[:-1], atol=1e-6)
