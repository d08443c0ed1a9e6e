"""The expert-criteria judge: reply parsing, the OpenAI-compatible client against a real
HTTP server on loopback, failure accounting and the report block evaluate_llm writes.

The server is ``http.server`` in a thread speaking the chat-completions API; what it
answers is scripted per benchmark answer, so every failure kind is exercised over a real
socket (HTTP 500, a reply slower than the timeout, a closed port).
"""

from __future__ import annotations

import json
import socket
import time
import tomllib
from collections import Counter
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
from conftest import ChatStub

from semilens.config import Config, JudgeConfig
from semilens.llm.evaluate import DIFFICULTIES
from semilens.llm.judge import CRITERIA, ReplyError, judge_report, load_rubric, parse_scores, resolve_judge
from semilens.openai_client import GIVE_UP_AFTER

ROOT = Path(__file__).parents[1]
RUBRIC = ROOT / "src" / "semilens" / "llm" / "rubric"


def scores(*values: int, **extra: Any) -> str:
    return json.dumps({**dict(zip(CRITERIA, values)), **extra})


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"  # nothing listens there once the socket is closed


def prediction(model: str, marker: str, difficulty: str) -> dict[str, Any]:
    return {
        "model": model,
        "id": f"bench:{marker}",
        "difficulty": difficulty,
        "category": "concept",
        "instruction": f"Why does the etch rate drop at high aspect ratio? {marker}",
        "reference": "Ion and neutral transport to the trench bottom falls (ARDE).",
        "prediction": f"Aspect-ratio dependent etching limits transport {marker}.",
    }


# ---------------------------------------------------------------------------- parsing


def test_a_reply_is_read_from_bare_fenced_or_prose_wrapped_json():
    assert parse_scores(scores(5, 4, 3, 4, 5, 2)) == (
        {
            "clarity": 5,
            "practicality": 4,
            "efficiency": 3,
            "logical_flow": 4,
            "expert_communication": 5,
            "specificity": 2,
        },
        None,
    )
    fenced = "Scores:\n```json\n" + scores(3, 3, 3, 3, 3, 1, rationale="terse") + "\n```\nDone."
    assert parse_scores(fenced) == (dict(zip(CRITERIA, (3, 3, 3, 3, 3, 1))), "terse")
    prose = "I read {the answer} twice. " + scores(2, 2, 2, 2, 2, 2) + " That is my verdict."
    assert parse_scores(prose)[0] == dict.fromkeys(CRITERIA, 2)


@pytest.mark.parametrize(
    ("reply", "kind", "detail"),
    [
        ("The answer is clear and practical; I'd give it a 4.", "not_json", "no JSON object"),
        (
            '{"clarity": 4, "practicality": 4}',
            "missing_criteria",
            "efficiency, logical_flow, expert_communication, specificity",
        ),
        (scores(4, 4, "4", 4, 4, 4), "not_integer", '"efficiency": "4"'),
        (scores(4, 4, 4, 4.0, 4, 4), "not_integer", '"logical_flow": 4.0'),
        (scores(True, 4, 4, 4, 4, 4), "not_integer", '"clarity": true'),
        (scores(7, 4, 4, 4, 0, 4), "out_of_range", '{"clarity": 7, "expert_communication": 0}'),
        ("[4, 4, 4, 4, 4, 4]", "not_json", "no JSON object"),
    ],
)
def test_a_bad_reply_is_refused_with_its_reason(reply, kind, detail):
    with pytest.raises(ReplyError) as err:
        parse_scores(reply)
    assert err.value.kind == kind and detail in err.value.detail


# ---------------------------------------------------------------------------- over HTTP


def test_the_judge_scores_over_http_and_counts_every_failure_by_kind():
    script = {
        "[s1]": [scores(5, 4, 3, 4, 5, 2, rationale="direct, one number missing")],
        "[s2]": ["```json\n" + scores(3, 3, 3, 3, 3, 3) + "\n```"],
        "[s3]": ["Overall a solid answer, I would rate it highly."],
        "[s4]": [json.dumps({k: 4 for k in CRITERIA if k != "specificity"})],
        "[s5]": [scores(7, 4, 4, 4, 4, 4)],
        "[s6]": [scores(4, 4, 4, 4, "4", 4)],
        "[s7]": [500, scores(1, 2, 1, 2, 1, 2)],  # a 500, then the retry succeeds
        "[s8]": [("sleep", 1.5, scores(5, 5, 5, 5, 5, 5))] * 3,  # slower than timeout_s, every try
        "[b1]": ["Here you go: " + scores(2, 2, 2, 2, 2, 2) + " -- the judge"],
    }
    preds = [
        prediction("sft", "[s1]", "easy"),
        prediction("sft", "[s2]", "easy"),
        prediction("sft", "[s3]", "medium"),
        prediction("sft", "[s4]", "medium"),
        prediction("sft", "[s5]", "hard"),
        prediction("sft", "[s6]", "hard"),
        prediction("sft", "[s7]", "hard"),
        prediction("sft", "[s8]", "easy"),
        prediction("base", "[b1]", "easy"),
    ]
    with ChatStub(script) as stub:
        jcfg = JudgeConfig(
            base_url=stub.url, model="judge-7b", timeout_s=0.5, max_retries=2, backoff_s=0, max_tokens=200
        )
        resolved = resolve_judge(jcfg, environ={})
        block, records = judge_report(preds, resolved, DIFFICULTIES, environ={"SEMILENS_JUDGE_API_KEY": "k-123"})
        # a request the client gave up on may reach the stub's log a moment later
        deadline = time.monotonic() + 10
        while len(stub.requests) < 12 and time.monotonic() < deadline:
            time.sleep(0.05)

    # every answer once, the 500 twice, the slow one three times (retried timeouts); all
    # asked the right model with the rubric and the answer (concurrently: in any order)
    asked = Counter(
        next(p["id"] for p in preds if p["id"][6:] in r["body"]["messages"][-1]["content"]) for r in stub.requests
    )
    assert asked == {**{p["id"]: 1 for p in preds}, "bench:[s7]": 2, "bench:[s8]": 3}
    rubric = load_rubric()
    anchor = (RUBRIC / "expert_communication.md").read_text().splitlines()[-1]
    for req in stub.requests:
        body = req["body"]
        p = next(p for p in preds if p["id"][6:] in body["messages"][-1]["content"])
        assert req["authorization"] == "Bearer k-123"
        assert body["model"] == "judge-7b" and body["temperature"] == 0 and body["max_tokens"] == 200
        system, user = body["messages"]
        assert system == {"role": "system", "content": rubric.system}
        assert anchor in system["content"] and "Use of examples & specificity" in system["content"]
        assert user["role"] == "user" and p["prediction"] in user["content"] and p["instruction"] in user["content"]
        assert p["reference"] in user["content"]

    by_id = {r["id"]: r for r in records}
    assert by_id["bench:[s1]"]["scores"] == dict(zip(CRITERIA, (5, 4, 3, 4, 5, 2)))
    assert by_id["bench:[s1]"]["rationale"] == "direct, one number missing"
    assert by_id["bench:[s2]"]["scores"] == dict.fromkeys(CRITERIA, 3)
    assert by_id["bench:[s7]"]["scores"] == dict(zip(CRITERIA, (1, 2, 1, 2, 1, 2)))
    kinds = {i: (r["failure"] or {}).get("kind") for i, r in by_id.items()}
    assert kinds == {
        "bench:[s1]": None,
        "bench:[s2]": None,
        "bench:[s3]": "not_json",
        "bench:[s4]": "missing_criteria",
        "bench:[s5]": "out_of_range",
        "bench:[s6]": "not_integer",
        "bench:[s7]": None,
        "bench:[s8]": "timeout",
        "bench:[b1]": None,
    }
    for r in records:  # a failure never carries scores; the raw reply is kept whenever there was one
        assert (r["scores"] is None) == (r["failure"] is not None)
        assert (r["reply"] is None) == (kinds[r["id"]] == "timeout")
    assert by_id["bench:[s3]"]["reply"] == "Overall a solid answer, I would rate it highly."
    assert by_id["bench:[s4]"]["failure"]["detail"] == "specificity"

    assert block["configured"] is True and block["model"] == "judge-7b" and block["base_url"] == stub.url
    assert block["criteria"] == CRITERIA and block["rubric_sha256"] == rubric.sha256 and block["items_per_model"] == 8
    assert block["requests"]["requests_sent"] == 12 and block["requests"]["retries"] == {
        "server_error": 1,
        "timeout": 2,
    }
    rows = {(r["model"], r["difficulty"]): r for r in block["scores"]}
    assert set(rows) == {(m, d) for m in ("sft", "base") for d in (*DIFFICULTIES, "all")}
    easy = rows["sft", "easy"]
    assert (easy["n_judged"], easy["n_failed"], easy["failures"]) == (2, 1, {"timeout": 1})
    assert [easy[k] for k in CRITERIA] == [4.0, 3.5, 3.0, 3.5, 4.0, 2.5]
    medium = rows["sft", "medium"]
    assert (medium["n_judged"], medium["n_failed"], medium["failures"]) == (
        0,
        2,
        {"missing_criteria": 1, "not_json": 1},
    )
    assert all(medium[k] is None for k in CRITERIA)  # nothing judged: no mean, not a zero
    hard = rows["sft", "hard"]
    assert (hard["n_judged"], hard["failures"]) == (1, {"not_integer": 1, "out_of_range": 1})
    assert [hard[k] for k in CRITERIA] == [1.0, 2.0, 1.0, 2.0, 1.0, 2.0]
    every = rows["sft", "all"]
    assert (every["n_judged"], every["n_failed"]) == (3, 5)
    assert [every[k] for k in CRITERIA] == [3.0, 3.0, 2.333, 3.0, 3.0, 2.333]
    assert rows["base", "easy"]["clarity"] == 2.0 and rows["base", "hard"]["n_judged"] == 0
    assert json.dumps(block)  # plain values only, as metrics/llm.json needs


def test_an_unreachable_judge_fails_fast_and_stops_being_asked():
    preds = [prediction("sft", f"[u{i}]", "easy") for i in range(GIVE_UP_AFTER + 2)]
    jcfg = JudgeConfig(base_url=closed_port_url(), model="m", max_retries=1, backoff_s=0, concurrency=1)
    block, records = judge_report(preds, jcfg, DIFFICULTIES, environ={})
    kinds = [r["failure"]["kind"] for r in records]
    assert kinds == ["connection"] * GIVE_UP_AFTER + ["not_attempted"] * 2
    assert block["scores"][-1]["failures"] == {"connection": GIVE_UP_AFTER, "not_attempted": 2}
    assert block["scores"][-1]["n_judged"] == 0 and block["scores"][-1]["clarity"] is None


def test_max_items_judges_the_same_first_rows_of_every_model():
    preds = [prediction(m, f"[{m}{i}]", "easy") for m in ("base", "sft") for i in range(3)]
    with ChatStub({f"[{m}{i}]": [scores(3, 3, 3, 3, 3, 3)] for m in ("base", "sft") for i in range(3)}) as stub:
        block, records = judge_report(
            preds, JudgeConfig(base_url=stub.url, model="m", max_items=2), DIFFICULTIES, environ={}
        )
    assert [r["id"] for r in records] == ["bench:[base0]", "bench:[base1]", "bench:[sft0]", "bench:[sft1]"]
    assert block["items_per_model"] == 2 and len(stub.requests) == 4


# ---------------------------------------------------------------------------- configuration


def test_without_a_judge_the_report_says_so_and_the_environment_can_set_one():
    assert resolve_judge(JudgeConfig(), environ={}) is None
    block, records = judge_report([prediction("sft", "[x]", "easy")], None, DIFFICULTIES)
    assert block["configured"] is False and block["scores"] is None and records == []
    env = {"SEMILENS_JUDGE_URL": "http://judge:8000/v1", "SEMILENS_JUDGE_MODEL": "qwen-judge"}
    resolved = resolve_judge(JudgeConfig(base_url="http://params/v1", model="from-params", timeout_s=9), environ=env)
    assert (resolved.base_url, resolved.model, resolved.timeout_s) == ("http://judge:8000/v1", "qwen-judge", 9)
    with pytest.raises(ValueError, match="SEMILENS_JUDGE_MODEL"):
        resolve_judge(JudgeConfig(), environ={"SEMILENS_JUDGE_URL": "http://judge/v1"})
    with pytest.raises(ValueError, match="should match pattern"):
        resolve_judge(JudgeConfig(), environ={"SEMILENS_JUDGE_URL": "judge:8000/v1", "SEMILENS_JUDGE_MODEL": "m"})
    cfg = Config.model_validate({"evaluate_llm": {"judge": {"base_url": "http://j/v1", "model": "j", "max_items": 20}}})
    assert cfg.evaluate_llm.judge.max_items == 20
    with pytest.raises(ValueError, match="temprature"):
        Config.model_validate({"evaluate_llm": {"judge": {"temprature": 0}}})


def test_the_rubric_ships_every_criterion_and_is_package_data():
    names = {p.name for p in RUBRIC.iterdir()}
    assert names == {"system.md", "user.md", *(f"{k}.md" for k in CRITERIA)}
    rubric = load_rubric()
    for key, title in CRITERIA.items():
        assert f"## {key}: {title}" in rubric.system  # the key the reply must use, beside its name
        assert f'"{key}": <1-5>' in rubric.system
    assert "$" not in rubric.system  # every placeholder filled
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["semilens"]
    assert all(any(fnmatch(f"llm/rubric/{n}", g) for g in globs) for n in names)


def test_editing_a_rubric_file_changes_the_prompt_and_its_hash(tmp_path: Path):
    for p in RUBRIC.iterdir():
        (tmp_path / p.name).write_text(p.read_text())
    (tmp_path / "efficiency.md").write_text("## efficiency: Efficiency & brevity\n- 5: say it in ten words.\n")
    edited, shipped = load_rubric(tmp_path), load_rubric()
    assert "say it in ten words" in edited.system and edited.sha256 != shipped.sha256


# ---------------------------------------------------------------------------- end to end


def test_the_judge_reaches_semilens_serve_of_the_sft_model_and_accounts_every_answer(serve_checkpoints):
    """The wiring end to end: the six-criteria judge pointed at `semilens serve` of an SFT
    adapter (a LoRA on the tiny text model). The untrained model cannot write the score JSON,
    so every answer comes back, is kept, and fails as a reply that is not scores — never as
    a connection, protocol or server error."""
    import httpx

    from semilens.serve import ServeOptions, make_app, serve_in_background

    preds = [prediction("sft", f"[e{i}]", d) for i, d in enumerate(DIFFICULTIES)]
    # The rubric and an answer run to ~2,200 of the tiny tokenizer's short tokens, past its
    # 1,024 positions (the server refuses that with a 400 by default); RoPE runs on past them.
    app = make_app(serve_checkpoints["adapter"], ServeOptions(model_name="semilens-sft", context_tokens=4096))
    with serve_in_background(app) as url:
        jcfg = JudgeConfig(base_url=url, model="semilens-sft", max_tokens=24, max_retries=0, backoff_s=0)
        block, records = judge_report(preds, resolve_judge(jcfg, environ={}), DIFFICULTIES, environ={})
        stats = httpx.get(url.removesuffix("/v1") + "/semilens/stats").json()

    assert stats["requests"] == stats["completed"] == len(preds)  # each answer asked once, each answered
    assert block["configured"] is True and block["base_url"] == url and block["model"] == "semilens-sft"
    assert block["requests"]["requests_sent"] == len(preds)
    parse_failures = {"not_json", "missing_criteria", "out_of_range", "not_integer"}
    for r in records:
        assert isinstance(r["reply"], str) and r["reply"], r  # the served model's own words are kept
        assert r["scores"] is None and r["failure"]["kind"] in parse_failures, r
    every = next(row for row in block["scores"] if row["model"] == "sft" and row["difficulty"] == "all")
    assert (every["n_judged"], every["n_failed"]) == (0, len(preds)) and every["clarity"] is None
