"""Causal-LM reports: held-out samples side by side (reference, round 0, final) and multiple-choice accuracy."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from test_report_metrics import write_causal_run

from fedpeft.report import load_run, make_report, run_stats
from fedpeft.report.render import markdown
from fedpeft.report.samples import prompt_question

CHAT = "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face\nuser\n{q}\nassistant\n"
QUESTIONS = ["what is the opposite of hot?", "what comes after monday?", "give the plural of the noun.\n\nmouse",
             "repeat the last word.\n\napple river chair",
             "is this review positive or negative?\n\nthe soup | was great.", "what is the opposite of up?"]
REFERENCES = ["cold", "tuesday", "mice", "chair", "positive", "down"]
MC = {0: (0.31, 0.35), 3: (0.45, 0.47), 6: (0.62, 0.6)}


def _with_samples(path: Path) -> Path:
    run = write_causal_run(path)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if row.get("round") in MC:
            row["mc_accuracy"], row["mc_accuracy_norm"] = MC[row["round"]]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = []
    for rnd, answers in ((0, ["hot hot", "", "mouses", "river", "negative", "up"]),
                         (3, ["warm"] * 6),
                         (6, ["stale"] * 6),  # written by a run that was killed and resumed: replaced below
                         (6, ["cold", "tuesday", "mice", "chair", "positive", "down"])):
        lines += [{"round": rnd, "prompt": CHAT.format(q=q), "reference": ref, "generated": a, "generated_ids": [1]}
                  for q, ref, a in zip(QUESTIONS, REFERENCES, answers)]
    (run / "generations.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


def test_prompt_question_strips_chat_and_alpaca_headers():
    assert prompt_question(CHAT.format(q="what is the opposite of hot?")) == "what is the opposite of hot?"
    alpaca = "### Instruction:\nrepeat the last word.\n\n### Input:\napple river\n\n### Response:\n"
    assert prompt_question(alpaca) == "repeat the last word. — apple river"
    # A WordPiece tokenizer decodes the Alpaca headers with spaces and in lower case.
    assert prompt_question("# # # instruction : what is the opposite of hot? # # # response :") == \
        "what is the opposite of hot?"
    assert prompt_question("no template at all") == "no template at all"


def test_report_shows_samples_side_by_side_and_multiple_choice(tmp_path):
    run = _with_samples(tmp_path / "causal")
    s = run_stats(load_run(run), 0.9)
    assert s.sample_rounds == (0, 6) and len(s.samples) == 5  # five prompts by default
    assert (s.samples[2].prompt, s.samples[2].reference, s.samples[2].first, s.samples[2].final) == (
        "give the plural of the noun. mouse", "mice", "mouses", "mice")
    assert (s.initial_mc_accuracy, s.final_mc_accuracy, s.final_mc_accuracy_norm) == (0.31, 0.62, 0.6)

    files = make_report([run], tmp_path / "report")
    md = files["report.md"].read_text()
    assert "### Held-out samples: round 0 vs round 6" in md
    assert "| prompt | reference | round 0 (zero-shot) | round 6 (final) |" in md
    assert "| what is the opposite of hot? | cold | hot hot | cold |" in md
    assert "| what comes after monday? | tuesday | (empty) | tuesday |" in md
    assert "the soup \\| was great. | positive | negative | positive |" in md  # pipes escaped
    assert "stale" not in md and "what is the opposite of up?" not in md  # resumed block replaced; 5 shown
    assert "| multiple-choice accuracy, first → final (norm) | 0.3100 → 0.6200 (0.6000) |" in md
    html = files["report.html"].read_text()
    assert "Held-out samples: round 0 vs round 6" in html and "<td>mouses</td><td>mice</td>" in html
    with files["rounds.csv"].open() as f:
        rounds = list(csv.DictReader(f))
    assert [(r["round"], r["mc_accuracy"]) for r in rounds if r["mc_accuracy"]] == [("0", "0.31"), ("3", "0.45"),
                                                                                   ("6", "0.62")]
    with files["runs.csv"].open() as f:
        assert next(csv.DictReader(f))["final_mc_accuracy_norm"] == "0.6"


def test_runs_without_generations_have_no_samples_section(tmp_path):
    run = write_causal_run(tmp_path / "plain")
    s = run_stats(load_run(run), 0.9)
    assert s.samples == [] and s.final_mc_accuracy is None
    md = markdown([s], "t", {s.label: []}, None)  # the report's Markdown, without rendering plots
    assert "Held-out samples" not in md and "multiple-choice" not in md and "Rouge-L" in md
