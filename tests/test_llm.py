"""Text model: the tiny Llama-3 preset, domain pretraining, LoRA SFT and evaluation.

The stages run for real on a tiny corpus and instruction set (a few steps each) and the
tests read what they wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import text_config

from semilens.io import read_json, read_jsonl
from semilens.llm.evaluate import evaluate_llm, final_quantity, math_correct
from semilens.llm.prepare import prepare_llm
from semilens.llm.pretrain import pack, pretrain_llm, split_corpus
from semilens.llm.sft import sft_llm
from semilens.text.clean import clean_markdown
from semilens.text.corpus import synth_corpus
from semilens.text.etch_math import problems
from semilens.text.extract import extract_pdfs
from semilens.text.instruct import synth_instructions
from semilens.text.tag import tag_ontology


def test_the_maths_answer_of_every_reference_response_is_read_back():
    """The parser that scores models must read the generator's own worked answers right."""
    for p in problems(400, seed=5):
        answer = {"value": p.answer, "unit": p.unit}
        assert math_correct(p.response, answer, rel_tol=0.02), (p.kind, p.response)


def test_maths_scoring_converts_units_and_refuses_wrong_ones():
    answer = {"value": 81.6, "unit": "s"}
    assert math_correct("Total = 1.36 min.", answer, 0.02)
    assert math_correct("so about = 81.6", answer, 0.02)  # a bare number is taken in the asked unit
    assert not math_correct("Total = 81.6 nm.", answer, 0.02)
    assert not math_correct("Total = 90 s.", answer, 0.02)
    assert not math_correct("I cannot say.", answer, 0.02)
    assert final_quantity("ER = 975 nm / 2.5 min = 390 nm/min.") == (390.0, "nm/min")
    assert final_quantity("rate 6.5 nm/s") == (390.0, "nm/min")


def test_packing_makes_full_blocks_with_document_boundaries():
    from semilens.llm.prepare import build_tokenizer

    tok = build_tokenizer(400)
    blocks = pack(["first document " * 20, "second one " * 30], tok, block_size=16)
    assert blocks and all(len(b) == 16 for b in blocks)
    flat = [t for b in blocks for t in b]
    assert flat[0] == tok.bos_token_id and tok.eos_token_id in flat
    chunks = [{"chunk_id": f"d:{i:04d}", "text": str(i)} for i in range(200)]
    train, held = split_corpus(chunks, 0.1)
    assert 8 <= len(held) <= 35 and len(train) + len(held) == 200
    assert split_corpus(chunks[:100], 0.1)[1] == [t for t in held if int(t) < 100]  # stable as chunks are added


@pytest.fixture(scope="module")
def llm_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llm")
    cfg = text_config(
        tmp,
        synth_corpus={"n_docs": 2, "max_units_per_doc": 4},
        synth_instructions={"n_math": 24},
        prepare_llm={"tiny": {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "heads": 2, "kv_heads": 1}},
        pretrain_llm={"max_steps": 30, "batch_size": 4, "block_size": 64, "heldout_fraction": 0.3, "learning_rate": 0.01, "save_steps": 15, "warmup_steps": 2},
        sft_llm={"max_steps": 6, "batch_size": 4, "max_length": 256, "save_steps": 3, "warmup_steps": 1},
        evaluate_llm={"max_rows": 12, "max_new_tokens": 24},
    )
    synth_corpus(cfg)
    extract_pdfs(cfg)
    clean_markdown(cfg)
    tag_ontology(cfg)
    synth_instructions(cfg)
    prep = prepare_llm(cfg)
    pre = pretrain_llm(cfg)
    sft = sft_llm(cfg)
    ev = evaluate_llm(cfg)
    return cfg, prep, pre, sft, ev


def test_prepare_builds_a_llama3_checkpoint_the_auto_classes_load(llm_run):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg, prep, *_ = llm_run
    base = Path(cfg.paths.models) / "llm" / "base"
    conf = AutoConfig.from_pretrained(base)
    assert conf.model_type == "llama" and conf.num_key_value_heads < conf.num_attention_heads
    tok = AutoTokenizer.from_pretrained(base)
    text = tok.apply_chat_template([{"role": "user", "content": "What is CMP?"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is CMP?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert AutoModelForCausalLM.from_pretrained(base).num_parameters() == prep["parameters"]
    assert "randomly initialised" in (base / "README.md").read_text()


def test_pretraining_lowers_heldout_perplexity_and_resumes(llm_run):
    cfg, _, pre, *_ = llm_run
    assert pre["steps"] == 30 and pre["heldout_tokens"] > 0
    assert pre["heldout_perplexity_after"] < 0.5 * pre["heldout_perplexity_before"]
    curve = (Path(cfg.paths.metrics) / "llm" / "pretrain_loss.csv").read_text().splitlines()
    assert curve[0] == "step,loss" and len(curve) >= 3
    # a second run with the same inputs resumes from the last checkpoint instead of starting over
    again = pretrain_llm(cfg)
    assert again["resumed_from"] == "checkpoint-30" and again["heldout_perplexity_after"] == pytest.approx(pre["heldout_perplexity_after"], rel=1e-3)


def test_sft_writes_an_adapter_and_a_merged_model(llm_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, _, _, sft, _ = llm_run
    models = Path(cfg.paths.models) / "llm"
    assert sft["steps"] == 6 and 0 < sft["trainable_parameters"]
    base = AutoModelForCausalLM.from_pretrained(models / "pretrained")
    model = PeftModel.from_pretrained(base, models / "adapter")
    assert any("lora_" in n for n, _ in model.named_parameters())
    assert AutoModelForCausalLM.from_pretrained(models / "sft").config.model_type == "llama"


def test_evaluation_has_one_row_per_model_and_difficulty(llm_run):
    cfg, *_, ev = llm_run
    report = read_json(Path(cfg.paths.metrics) / "llm.json")
    seen = {(r["model"], r["difficulty"]) for r in report["rows"]}
    assert seen == {(m, d) for m in ("base", "pretrained", "sft") for d in ("easy", "medium", "hard", "all")}
    assert report["judge"]["configured"] is False and report["judge"]["scores"] is None
    preds = list(read_jsonl(Path(cfg.paths.models) / "llm" / "eval" / "predictions.jsonl"))
    assert len(preds) == 3 * report["benchmark_rows"]
    assert ev["pretrained"]["heldout_perplexity"] < ev["base"]["heldout_perplexity"]
    for r in report["rows"]:
        assert r["rouge_l"] is None or 0 <= r["rouge_l"] <= 1
        assert json.dumps(r)  # plain numbers only
