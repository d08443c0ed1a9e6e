"""The answering decoder (semilens.llm.decode) against transformers' own greedy generate."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from semilens.llm.decode import greedy_answers, grouped_attention

PROMPTS = [
    "Etch rate = 300 nm / 2 min =",
    "What is the selectivity of the oxide etch?",
    "x",
    "Why does the photoresist reflow at 150 C in a hard bake?",
    "CMP removes 200 nm",
    "The sheet resistance of the implanted layer after anneal",
    "ALD",
]


def _tiny_gqa_llama(tok):
    """A two-layer Llama whose 4 query heads share 2 key-value heads (as SmolLM2's do)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.3,  # large weights: attention, positions and padding all move the argmax
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def _generate_alone(model, tok, prompt, max_new_tokens, eos):
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos)
    answer = out[0, ids["input_ids"].shape[1] :]
    return tok.decode(answer, skip_special_tokens=True).strip(), len(answer)


@pytest.fixture(scope="module")
def model_and_tok():
    from semilens.tokenizer import llama3_tokenizer

    tok = llama3_tokenizer(400)
    model = _tiny_gqa_llama(tok)
    # An end token the untrained model does write, mid-answer for some rows and not for
    # others (the one most rows write), so rows leave the batch at different steps.
    written = Counter()
    with torch.no_grad():
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt", add_special_tokens=False)
            out = model.generate(**ids, max_new_tokens=10, do_sample=False, eos_token_id=None)
            written.update(set(out[0, ids["input_ids"].shape[1] :].tolist()))
    model.generation_config.eos_token_id = written.most_common(1)[0][0]
    return model, tok


@pytest.mark.parametrize("batch_size", [1, 2, 3, 64])
def test_answers_equal_generate_one_prompt_at_a_time(model_and_tok, batch_size):
    model, tok = model_and_tok
    eos = model.generation_config.eos_token_id
    budgets = [12, 5, 12, 9, 12, 1, 7]
    expected, lengths = zip(*(_generate_alone(model, tok, p, b, eos) for p, b in zip(PROMPTS, budgets)))
    assert greedy_answers(model, tok, PROMPTS, budgets, batch_size) == list(expected)
    # rows did end at different steps: some on the end token, some on their budget
    assert any(n < b for n, b in zip(lengths, budgets))
    assert len(set(lengths)) > 2


def test_a_zero_budget_answers_nothing_and_lists_must_match(model_and_tok):
    model, tok = model_and_tok
    assert greedy_answers(model, tok, ["x", "y"], [0, 3], 4)[0] == ""
    with pytest.raises(ValueError, match="one max_new_tokens and calculator_calls per prompt"):
        greedy_answers(model, tok, ["x", "y"], [3], 4)


def test_grouped_attention_is_the_decoders_alone(model_and_tok):
    """Inside the block the model decodes with grouped SDPA; after it, plain SDPA again,
    so a model the decoder used answers generate as before."""
    model, _ = model_and_tok
    assert model.config._attn_implementation == "sdpa"
    with grouped_attention(model):
        assert model.config._attn_implementation != "sdpa"
    assert model.config._attn_implementation == "sdpa"
