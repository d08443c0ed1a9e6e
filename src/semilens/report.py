"""The report people look at: one self-contained HTML page over everything the pipeline made.

Reads the stages' metrics and evaluation outputs (declared as the ``report`` stage's deps
in dvc.yaml) and writes ``paths.reports/index.html`` with every image embedded as a data
URI, so the one file can be mailed or attached to a review. No script runs in the page:
it renders the same with JavaScript off, and there is nothing to log a console error.

Sections: models (VLM families base vs fine-tuned, the text model's rows and judge
scores), plots (the DVC loss plots and per-type accuracy, drawn with matplotlib), a grid
of test images with reference and predicted captions and answers marked right or wrong,
dataset statistics, ontology coverage, what was quarantined and why, and how well the
measurements match the synthetic images' ground truth.

Run: python -m stages.report
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from semilens.config import Config
from semilens.io import atomic_write_text, read_json, read_jsonl
from semilens.scores import answer_correct

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:16px 24px;color:#1d232a}
h1{font-size:24px;margin:8px 0 4px}h2{font-size:19px;border-bottom:2px solid #d0d7de;padding-bottom:3px;margin-top:32px}
h3{font-size:15px;margin:18px 0 6px}table{border-collapse:collapse;margin:6px 0 12px}
td,th{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f3f5f7}
td.num{text-align:right;font-variant-numeric:tabular-nums}.ok{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}
.muted{color:#59636e}.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:14px}
.card{border:1px solid #d0d7de;border-radius:6px;padding:8px}.card img{width:100%;image-rendering:pixelated;border-radius:4px}
.card table{font-size:12px;width:100%;table-layout:fixed}.card td{overflow-wrap:anywhere}.plots img{max-width:560px;margin:4px 12px 4px 0}nav a{margin-right:12px}
.summary td{font-size:15px}
"""


# ---------------------------------------------------------------- small HTML helpers


# metrics/quantize.json keys shown in the report's quantisation table, in order
QUANTIZE_COLUMNS = (
    "method",
    "bits",
    "group_size",
    "linear_size_ratio",
    "heldout_perplexity_unquantized",
    "heldout_perplexity_quantized",
    "perplexity_ratio",
    "reloads_and_generates",
)


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in (headers or columns))
    body = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{v if isinstance(v, Markup) else esc(fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


class Markup(str):
    """Already-escaped HTML for a table cell."""


def mark(ok: bool | None) -> Markup:
    if ok is None:
        return Markup('<span class="muted">–</span>')
    return Markup('<span class="ok">✓</span>' if ok else '<span class="bad">✗</span>')


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def img(data: bytes, alt: str, width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    return f'<img src="{png_uri(data)}" alt="{esc(alt)}"{size}>'


def _figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    # No timestamp or version in the file: the same numbers give the same bytes.
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display: the stage runs headless
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------- plots


def read_curve(path: Path) -> list[tuple[float, float]]:
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return [(float(r["step"]), float(r["loss"])) for r in csv.DictReader(fh)]


def curve_plot(curves: Mapping[str, list[tuple[float, float]]], title: str) -> bytes | None:
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for label, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _figure_png(fig)


def bar_plot(groups: Sequence[str], series: Mapping[str, Sequence[float | None]], title: str, ylabel: str) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=label)
    ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))], groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _figure_png(fig)


# ---------------------------------------------------------------- sections


def vlm_section(cfg: Config, family: str) -> str:
    metrics = Path(cfg.paths.metrics)
    report_path = metrics / "vlm" / f"{family}.json"
    if not report_path.is_file():
        return f"<h3>{esc(family)}</h3><p class='muted'>no evaluation yet ({esc(report_path)})</p>"
    rep = read_json(report_path)
    keys = [
        "vqa_accuracy",
        "vqa_macro_accuracy",
        "class_accuracy",
        "caption_rouge_l",
        "caption_bleu",
        "caption_bertscore_f1",
    ]
    rows = [
        {
            "metric": k,
            "base": rep["base"].get(k),
            "fine-tuned": rep["finetuned"].get(k),
            "change": rep.get("delta", {}).get(k),
        }
        for k in keys
    ]
    types = sorted(rep["finetuned"].get("vqa_per_type", {}))
    per_type = [
        {
            "type": t,
            "n": rep["finetuned"]["vqa_per_type"][t]["n"],
            "base": rep["base"]["vqa_per_type"].get(t, {}).get("accuracy"),
            "fine-tuned": rep["finetuned"]["vqa_per_type"][t]["accuracy"],
        }
        for t in types
    ]
    # Real micrographs first: the synthetic ones are drawn by the project and say less
    # about what a user's images will get.
    origins = [
        {
            "images": kind,
            "n": f"{rep[kind]['n_images']} images, {rep[kind]['n_rows']} rows",
            **{
                f"{m} {k}": rep[kind][m].get(k)
                for m in ("base", "finetuned")
                for k in ("vqa_accuracy", "class_accuracy", "caption_rouge_l")
            },
        }
        for kind in ("real", "synthetic")
        if kind in rep
    ]
    origin_cols = ["images", "n"] + [
        f"{m} {k}" for m in ("base", "finetuned") for k in ("vqa_accuracy", "class_accuracy", "caption_rouge_l")
    ]
    by_origin = (
        table(origins, origin_cols)
        if origins
        else "<p class='muted'>No real micrograph in the test split: every score below is on synthetic images.</p>"
    )
    plots = []
    if types:
        plots.append(
            img(
                bar_plot(
                    types,
                    {"base": [r["base"] for r in per_type], "fine-tuned": [r["fine-tuned"] for r in per_type]},
                    f"{family}: VQA accuracy per question type",
                    "accuracy",
                ),
                f"{family} VQA accuracy per type",
            )
        )
    loss = curve_plot(
        {"fine-tune": read_curve(metrics / "vlm" / f"loss_{family}.csv")}, f"{family}: LoRA fine-tune loss"
    )
    if loss:
        plots.append(img(loss, f"{family} fine-tune loss"))
    prep = metrics / "vlm" / f"prepare_{family}.json"
    extra = ""
    if prep.is_file():
        p = read_json(prep)
        extra = (
            f"<p>Base: {esc(p.get('base'))}; generic-task accuracy {esc(fmt(p.get('generic_accuracy_before')))} before and "
            f"{esc(fmt(p.get('generic_accuracy_after')))} after its generic pretraining.</p>"
        )
    return (
        f"<h3>{esc(family)}</h3>{extra}<p>Test split: {esc(fmt(rep.get('n_test_rows')))} rows, "
        f"{esc(fmt(rep['finetuned'].get('n_vqa')))} questions, {esc(fmt(rep['finetuned'].get('n_captions')))} captions.</p>"
        + by_origin
        + table(rows, ["metric", "base", "fine-tuned", "change"])
        + table(per_type, ["type", "n", "base", "fine-tuned"], ["question type", "n", "base", "fine-tuned"])
        + f"<div class='plots'>{''.join(plots)}</div>"
    )


def compare_section(cfg: Config) -> str:
    """The families side by side (compare_vlm): fine-tuned scores and the margins over each base."""
    path = Path(cfg.paths.metrics) / "vlm" / "compare.json"
    if not path.is_file():
        return ""
    comp = read_json(path)
    keys = ["vqa_accuracy", "class_accuracy", "caption_rouge_l", "caption_bertscore_f1"]
    rows = []
    for family in comp["families"]:
        metrics = comp["metrics"].get(family, {})
        margins = comp["margins"].get(family, {})
        row: dict[str, Any] = {"family": family}
        row.update({k: metrics.get(k, {}).get("finetuned") for k in keys})
        row["margins"] = Markup(" ".join(f"{mark(ok)} {esc(name)}" for name, ok in margins.items() if name != "all"))
        rows.append(row)
    return "<h3>Families side by side (fine-tuned)</h3>" + table(rows, ["family", *keys, "margins"])


def _label_text(label: Any) -> str:
    """A class label for display; unlabelled images (a user's micrographs with no class)
    come out of parquet as None or NaN."""
    return label if isinstance(label, str) and label else "unlabelled"


def _pick_images(by_image: Mapping[str, list[dict[str, Any]]], labels: Mapping[str, str], limit: int) -> list[str]:
    """Round-robin over classes (sorted image ids within each), so every class shows."""
    per_label: dict[str, list[str]] = defaultdict(list)
    for image_id in sorted(by_image):
        per_label[_label_text(labels.get(image_id))].append(image_id)
    picked: list[str] = []
    while len(picked) < limit and any(per_label.values()):
        for label in sorted(per_label):
            if per_label[label] and len(picked) < limit:
                picked.append(per_label[label].pop(0))
    return picked


def image_grid(cfg: Config, family: str) -> tuple[str, dict[str, int]]:
    """Test images with reference and predicted captions and answers (✓/✗ per model)."""
    import pandas as pd

    preds_path = Path(cfg.paths.models) / family / "eval" / "predictions.jsonl"
    test_path = Path(cfg.paths.vqa) / "test.parquet"
    if not preds_path.is_file() or not test_path.is_file():
        return "<p class='muted'>no predictions yet</p>", {}
    by_image: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in read_jsonl(preds_path):
        by_image[row["image_id"]].append(row)
    df = pd.read_parquet(test_path, columns=["image_id", "label", "source", "images"]).drop_duplicates("image_id")
    pictures = {r.image_id: r for r in df.itertuples(index=False)}
    labels = {k: _label_text(v.label) for k, v in pictures.items()}
    picked = _pick_images({k: v for k, v in by_image.items() if k in pictures}, labels, cfg.report.max_images)
    cards, counts = [], Counter()
    for image_id in picked:
        pic = pictures[image_id]
        data = pic.images[0]["bytes"]
        rows = sorted(by_image[image_id], key=lambda r: r["id"])
        caption = next((r for r in rows if r["task"] == "caption"), None)
        qa_rows = []
        for r in rows:
            if r["task"] == "caption":
                continue
            ok_ft = answer_correct(r["finetuned"], r["reference"], r["question_type"])
            ok_base = answer_correct(r["base"], r["reference"], r["question_type"])
            counts["answers"] += 1
            counts["finetuned_right"] += ok_ft
            counts["base_right"] += ok_base
            qa_rows.append(
                {
                    "question": r["question"],
                    "reference": r["reference"],
                    "fine-tuned": Markup(f"{mark(ok_ft)} {esc(r['finetuned'])}"),
                    "base": Markup(f"{mark(ok_base)} {esc(r['base'])}"),
                }
            )
        cap = ""
        if caption:
            cap = (
                f"<p><b>reference</b>: {esc(caption['reference'])}<br><b>fine-tuned</b>: {esc(caption['finetuned'])}"
                f"<br><span class='muted'><b>base</b>: {esc(caption['base'])}</span></p>"
            )
        cards.append(
            f"<div class='card'>{img(data, f'test image {image_id} ({labels[image_id]})')}"
            f"<div><b>{esc(labels[image_id])}</b> <span class='muted'>{esc(pic.source)}</span></div>{cap}"
            + table(qa_rows, ["question", "reference", "fine-tuned", "base"])
            + "</div>"
        )
    counts["images"] = len(picked)
    counts["test_images"] = len(by_image)
    note = (
        f"<p>{len(picked)} of {len(by_image)} test images, every class shown; "
        f"answers right here: fine-tuned {counts['finetuned_right']}/{counts['answers']}, base {counts['base_right']}/{counts['answers']} "
        "(✓ = right by the evaluation's own rule: numbers within tolerance, units understood).</p>"
    )
    return note + f"<div class='grid'>{''.join(cards)}</div>", dict(counts)


def llm_section(cfg: Config) -> str:
    metrics = Path(cfg.paths.metrics)
    path = metrics / "llm.json"
    if not path.is_file():
        return "<p class='muted'>no text-model evaluation yet</p>"
    rep = read_json(path)
    cols = [
        "model",
        "difficulty",
        "n",
        "heldout_perplexity",
        "rouge_l",
        "bertscore_f1",
        "math_exact",
        "math_exact_calculator",
        "math_n",
    ]
    out = [
        f"<p>Benchmark: {esc(fmt(rep.get('benchmark_rows')))} held-out pairs; maths counted exact within "
        f"{esc(fmt(rep.get('math_rel_tol')))} relative.</p>",
        table(rep.get("rows", []), cols),
    ]
    maths = rep.get("maths") or {}
    if maths:
        out.append(
            "<h3>Etching maths, with the calculator</h3>"
            + table(
                [
                    {
                        "model": name,
                        "shown": "zero-shot" if mode == "zero_shot" else f"{tally.get('shots')} worked answers first",
                        "exact": f"{tally['correct']}/{tally['n']}",
                        **tally.get("difficulty", {}),
                        "by kind": ", ".join(f"{k} {v}" for k, v in tally.get("kind", {}).items()),
                    }
                    for name, modes in maths.items()
                    for mode, tally in modes.items()
                ],
                ["model", "shown", "exact", "easy", "medium", "hard", "by kind"],
            )
        )
    judge = rep.get("judge") or {}
    if judge.get("scores"):
        crit = list(judge.get("criteria") or {})
        out.append(
            "<h3>Expert criteria (LLM judge, 1–5)</h3>"
            + table(judge["scores"], ["model", "difficulty", "n_judged", "n_failed", *crit])
        )
    else:
        out.append(f"<p class='muted'>Expert criteria: {esc(judge.get('note', 'not scored'))}</p>")
    q = metrics / "quantize.json"
    if q.is_file():
        qd = read_json(q)
        out.append(
            table(
                [{k: qd.get(k) for k in QUANTIZE_COLUMNS}],
                list(QUANTIZE_COLUMNS),
                [
                    "quantization",
                    "bits",
                    "group",
                    "linear size ratio",
                    "perplexity before",
                    "after",
                    "ratio",
                    "reloads",
                ],
            )
        )
    loss = curve_plot(
        {
            "domain pretraining": read_curve(metrics / "llm" / "pretrain_loss.csv"),
            "LoRA SFT": read_curve(metrics / "llm" / "sft_loss.csv"),
        },
        "text model: training loss",
    )
    if loss:
        out.append(f"<div class='plots'>{img(loss, 'text model training loss')}</div>")
    return "".join(out)


def dataset_section(cfg: Config) -> str:
    metrics = Path(cfg.paths.metrics)
    out = []
    split = metrics / "split.json"
    if split.is_file():
        s = read_json(split)
        labels = sorted({label for v in s.values() for label in v.get("labels", {})})
        rows = [
            {
                "split": name,
                "images": v.get("images"),
                "rows": v.get("rows"),
                **{lab: v.get("labels", {}).get(lab, 0) for lab in labels},
            }
            for name, v in s.items()
        ]
        out.append("<h3>VQA dataset</h3>" + table(rows, ["split", "images", "rows", *labels]))
    ann = metrics / "annotate.json"
    if ann.is_file():
        a = read_json(ann)
        out.append(
            f"<p>Annotation backend {esc(a.get('backend'))}: {esc(fmt(a.get('n_images')))} images, {esc(fmt(a.get('n_qa')))} questions, "
            f"{esc(fmt(a.get('n_skipped')))} images skipped.</p>"
        )
    ins = metrics / "instructions.json"
    if ins.is_file():
        i = read_json(ins)
        rows = [
            {"split": k, **v.get("by_category", {}), "total": sum(v.get("by_category", {}).values())}
            for k, v in i.get("splits", {}).items()
        ]
        cats = sorted(i.get("by_category", {}))
        out.append(
            f"<h3>Instruction pairs</h3><p>{esc(fmt(i.get('pairs')))} pairs written by {esc(i.get('backend'))}.</p>"
            + table(rows, ["split", *cats, "total"])
        )
    clean = metrics / "clean.json"
    if clean.is_file():
        c = read_json(clean)
        sims = [d.get("similarity") for d in c.get("per_document", []) if d.get("similarity") is not None]
        out.append(
            f"<p>Corpus: {esc(fmt(c.get('documents')))} documents, {esc(fmt(c.get('chunks')))} chunks; leaked running lines "
            f"{esc(fmt(c.get('leaked_running_lines')))}; lowest similarity to the ground truth {esc(fmt(min(sims) if sims else None))}.</p>"
        )
    return "".join(out) or "<p class='muted'>no dataset statistics yet</p>"


def ontology_section(cfg: Config) -> str:
    path = Path(cfg.paths.metrics) / "ontology.json"
    if not path.is_file():
        return "<p class='muted'>no ontology tagging yet</p>"
    o = read_json(path)
    rows = [
        {
            "level": lvl,
            "covered": o.get(f"{lvl}_covered"),
            "total": o.get(f"{lvl}_total"),
            "missed": ", ".join(o.get(f"{lvl}_missed") or []) or "none",
        }
        for lvl in ("groups", "modules", "units")
    ]
    return (
        f"<p>{esc(fmt(o.get('chunks')))} chunks, {esc(fmt(o.get('chunks_untagged')))} untagged. Full table: "
        f"<code>{esc(Path(cfg.paths.tags) / 'coverage.md')}</code>.</p>"
        + table(rows, ["level", "covered", "total", "missed"])
    )


def _reasons(rows: Iterable[Mapping[str, Any]]) -> Counter:
    return Counter(str(r.get("reason", "unknown")).split(":")[0][:80] for r in rows)


def quarantine_section(cfg: Config) -> str:
    sources = [
        ("images", Path(cfg.paths.interim_images) / "quarantine.jsonl"),
        ("PDF pages", Path(cfg.paths.pages) / "quarantine.jsonl"),
        ("annotations", Path(cfg.paths.annotations) / "skipped.jsonl"),
    ]
    rows, details = [], []
    for kind, path in sources:
        entries = list(read_jsonl(path)) if path.is_file() else []
        rows.append({"what": kind, "quarantined": len(entries), "file": str(path)})
        for reason, n in _reasons(entries).most_common():
            details.append({"what": kind, "reason": reason, "n": n})
    text = table(rows, ["what", "quarantined", "file"])
    if details:
        text += table(details, ["what", "reason", "n"])
    else:
        text += "<p>Nothing was quarantined: every input was read.</p>"
    return text


def measurement_section(cfg: Config) -> str:
    path = Path(cfg.paths.metrics) / "measure.json"
    if not path.is_file():
        return "<p class='muted'>no measurements yet</p>"
    m = read_json(path)
    rows = [{"class": k, **v} for k, v in sorted(m.get("per_class", {}).items())]
    target = m.get("target")
    lead = f"<p>{esc(fmt(m.get('images')))} images measured, {esc(fmt(m.get('scored')))} scored against their synthetic ground truth"
    lead += f"; target: {esc(json.dumps(target))}</p>" if target else ".</p>"
    return lead + table(
        rows,
        ["class", "n", "median_count_error", "median_size_error", "median_pitch_error"],
        ["class", "images", "median count error", "median size error", "median pitch error"],
    )


# ---------------------------------------------------------------- the page


def _weighted(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """Mean of ``key`` over a model's rows (one per difficulty), weighted by their n; rows
    without the number (no items of that kind) do not count."""
    scored = [(r[key], r.get("n") or 0) for r in rows if isinstance(r.get(key), (int, float))]
    total = sum(n for _, n in scored)
    if not scored:
        return None
    return sum(v * n for v, n in scored) / total if total else scored[0][0]


def build_report(cfg: Config) -> dict[str, Any]:
    families = list(cfg.prepare_vlm.bases)
    sections: list[tuple[str, str, str]] = []  # (anchor, title, html)
    summary_rows = []
    for family in families:
        path = Path(cfg.paths.metrics) / "vlm" / f"{family}.json"
        if path.is_file():
            rep = read_json(path)
            for key in ("vqa_accuracy", "class_accuracy", "caption_rouge_l"):
                summary_rows.append(
                    {
                        "model": f"VLM {family}",
                        "metric": key,
                        "base": rep["base"].get(key),
                        "fine-tuned": rep["finetuned"].get(key),
                    }
                )
    llm_path = Path(cfg.paths.metrics) / "llm.json"
    if llm_path.is_file():
        by_model = defaultdict(list)
        for r in read_json(llm_path).get("rows", []):
            by_model[r["model"]].append(r)
        for key in ("heldout_perplexity", "rouge_l"):
            vals = {m: _weighted(rs, key) for m, rs in by_model.items()}
            summary_rows.append(
                {"model": "text", "metric": key, "base": vals.get("base"), "fine-tuned": vals.get("sft")}
            )
    vlm_html = compare_section(cfg) + "".join(vlm_section(cfg, f) for f in families)
    grids, grid_counts = [], {}
    for family in families:
        grid, counts = image_grid(cfg, family)
        grids.append(f"<h3>{esc(family)}</h3>{grid}")
        grid_counts[family] = counts
    sections += [
        ("vlm", "Vision-language models: base vs fine-tuned", vlm_html),
        ("images", "Test images: captions and answers", "".join(grids)),
        ("llm", "Text model", llm_section(cfg)),
        ("data", "Datasets", dataset_section(cfg)),
        ("ontology", "Ontology coverage", ontology_section(cfg)),
        ("quarantine", "Quarantine", quarantine_section(cfg)),
        ("measure", "Measurement accuracy on synthetic images", measurement_section(cfg)),
    ]
    nav = "".join(f"<a href='#{a}'>{esc(t)}</a>" for a, t, _ in sections)
    body = "".join(f"<h2 id='{a}'>{esc(t)}</h2>{h}" for a, t, h in sections)
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>semilens report</title><link rel='icon' href='data:,'><style>{CSS}</style></head><body>"
        "<h1>semilens report</h1><p class='muted'>Built by the <code>report</code> stage from the pipeline's "
        "metrics and evaluation outputs; <code>semilens trace</code> follows any model to its source files.</p>"
        f"<table class='summary'><tr><th>model</th><th>metric</th><th>base</th><th>fine-tuned</th></tr>"
        + "".join(
            f"<tr><td>{esc(r['model'])}</td><td>{esc(r['metric'])}</td><td class='num'>{esc(fmt(r['base']))}</td>"
            f"<td class='num'>{esc(fmt(r['fine-tuned']))}</td></tr>"
            for r in summary_rows
        )
        + f"</table><nav>{nav}</nav>{body}</body></html>\n"
    )
    out = Path(cfg.paths.reports) / "index.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)
    return {
        "report": str(out),
        "bytes": len(page.encode()),
        "families": families,
        "images_shown": {f: c.get("images", 0) for f, c in grid_counts.items()},
        "embedded_images": page.count("<img "),
    }
