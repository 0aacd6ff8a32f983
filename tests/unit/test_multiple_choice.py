"""Multiple-choice evaluation: choice log-likelihoods against a hand computation, acc / acc_norm, question files,
the built-in set, and the Evaluator scoring it on generation rounds."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import fedpeft.multiple_choice as mc
from fedpeft.data import DataError
from fedpeft.data.builtin_choices import CATEGORIES, generate
from fedpeft.data.choices import Question, load_choice_file, load_questions
from fedpeft.data.prompts import render_prompt
from fedpeft.models import build_model, load_tokenizer
from fedpeft.multiple_choice import PLAIN, context_text, encode_requests, multiple_choice_scores, score_questions
from fedpeft.app.recipe import validate

TINY = {"kind": "causal-lm", "source": "tiny", "max_length": 32,
        "tiny": {"arch": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "intermediate_size": 64}}
# Choices of 1 to 5 word-piece tokens, and questions of different lengths (so batches are padded).
QUESTIONS = [
    Question("what is the opposite of hot?", ("cold", "warm weather", "a very slow turtle", "x"), 0),
    Question("which one is an animal: chair, tiger or lamp?", ("chair", "tiger", "lamp"), 1),
    Question("is the movie good?", ("positive", "negative sentiment overall"), 1),
    Question("one plus one?", ("two", "three", "eleven hundred", "zero"), 3),
]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models gain nothing from a second thread, and on a busy machine its barriers cost 10x.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_model(arch: str = "llama"):
    """A tiny random decoder with sharp attention: at the default init (std 0.02) attention is near uniform,
    so wrong positions or a wrong mask would hardly move a log-likelihood; at std 0.5 they do."""
    cfg = validate({"model": {**TINY, "tiny": {**TINY["tiny"], "arch": arch}}})
    model = build_model(cfg, 0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.get_base_model().named_parameters():
            if p.dim() == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval(), load_tokenizer(cfg.model)


@pytest.fixture(scope="module")
def tiny():
    return _tiny_model()


def _hand(model, tokenizer, questions, template="auto"):
    """Each choice's log-likelihood, one unpadded sequence at a time: log_softmax of a plain forward pass."""
    out = []
    with torch.no_grad():
        for q in questions:
            prompt = context_text(tokenizer, q.question, template)
            ctx = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
            ctx = ctx if ctx[:1] == [bos] else [bos, *ctx]
            row = []
            for choice in q.choices:
                text = f" {choice}" if template == PLAIN else choice
                cont = tokenizer(text, add_special_tokens=False)["input_ids"]
                logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].double()
                logp = torch.log_softmax(logits, dim=-1)
                row.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
            out.append(row)
    return out


def _hand_metrics(questions, logliks, template="auto"):
    acc = np.mean([int(np.argmax(ll)) == q.answer for q, ll in zip(questions, logliks)])
    lengths = [[len(f" {c}" if template == PLAIN else c) for c in q.choices] for q in questions]
    norm = np.mean([int(np.argmax(np.array(ll) / np.array(n))) == q.answer
                    for q, ll, n in zip(questions, logliks, lengths)])
    return {"mc_accuracy": acc, "mc_accuracy_norm": norm}


def _check(model, tokenizer, template="auto", batch_size=3, share_context=True):
    hand = _hand(model, tokenizer, QUESTIONS, template)
    scores = score_questions(model, tokenizer, QUESTIONS, batch_size=batch_size, template=template,
                             share_context=share_context)
    for got, want in zip(scores.logliks, hand):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert scores.metrics() == pytest.approx(_hand_metrics(QUESTIONS, hand, template))
    # acc_norm divides by the continuation's characters, not its tokens
    assert scores.chars[0] == [len(f" {c}" if template == PLAIN else c) for c in QUESTIONS[0].choices]
    return scores


def _no_full_sequences(*args, **kwargs):
    raise AssertionError("whole sequences scored: the shared-context path fell back")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_shared_context_logliks_equal_a_hand_computation(arch, monkeypatch):
    model, tok = _tiny_model(arch)
    reqs = encode_requests(tok, QUESTIONS)
    assert len({len(r.continuation) for r in reqs}) >= 4  # continuations of different token lengths
    if arch != "bert":  # BERT's decoder cache may not be copyable per row: it may take the fallback
        monkeypatch.setattr(mc, "_full_batch", _no_full_sequences)
    _check(model, tok, batch_size=3)


def test_requests_without_a_shared_prefix_equal_single_forward_passes(tiny):
    model, _ = tiny
    reqs = [mc.Request(0, 0, [5, 6, 7], [8], 1), mc.Request(0, 1, [5, 6, 7], [9, 10, 11], 3),
            mc.Request(1, 0, [12, 13], [14, 15], 2), mc.Request(2, 0, [16, 17, 18, 19, 20], [21], 1)]
    assert mc._common_prefix([r.context for r in reqs]) == 0
    assert mc._common_prefix([[1, 2, 3], [1, 2, 3, 4], [1, 2, 5]]) == 2
    assert mc._common_prefix([[1, 2, 3], [1, 2, 3]]) == 2  # the last context token is never shared
    with torch.no_grad():
        want = []
        for r in reqs:
            logp = torch.log_softmax(model(input_ids=torch.tensor([r.context + r.continuation])).logits[0].double(), -1)
            want.append(sum(float(logp[len(r.context) - 1 + j, t]) for j, t in enumerate(r.continuation)))
    for share in (True, False):
        got = mc.continuation_logliks(model, reqs, batch_size=2, pad_id=0, share_context=share)
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # rotary (relative) and learned (absolute) positions
def test_whole_sequence_paths_left_and_right_padded_agree(arch, monkeypatch):
    model, tok = _tiny_model(arch)
    shared = score_questions(model, tok, QUESTIONS, batch_size=64).logliks
    left = _check(model, tok, batch_size=2, share_context=False).logliks
    monkeypatch.setattr(mc, "_takes_position_ids", lambda model_type: False)
    right = _check(model, tok, batch_size=5).logliks
    flat = [np.concatenate(x) for x in (shared, left, right)]
    assert np.allclose(flat[0], flat[1], atol=1e-4) and np.allclose(flat[1], flat[2], atol=1e-4)


def test_scoring_leaves_every_module_in_its_mode(tiny):
    model, tok = tiny
    model.train()
    model.get_base_model().eval()  # as build_model hands it out: a train-mode wrapper over an eval-mode base
    modes = [m.training for m in model.modules()]
    score_questions(model, tok, QUESTIONS[:1])
    assert [m.training for m in model.modules()] == modes
    model.eval()


def test_chat_template_scores_the_choice_as_the_assistant_turn(tiny):
    model, tok = tiny
    chat = copy.deepcopy(tok)
    chat.chat_template = CHAT_TEMPLATE
    text = context_text(chat, "one plus one?")
    assert text == chat.apply_chat_template([{"role": "user", "content": "one plus one?"}], tokenize=False,
                                            add_generation_prompt=True)
    assert text == render_prompt(chat, "one plus one?", "", "auto")
    req = encode_requests(chat, QUESTIONS[3:])[2]
    assert chat.decode(req.continuation) == "eleven hundred"
    assert chat.decode(req.context).replace(" ", "").endswith("<|assistant|>")
    _check(model, chat)
    # Without a chat template the same question is an Alpaca prompt; "plain" is the harness's own format.
    assert "### Response:" in context_text(tok, "q")
    assert context_text(tok, "q", PLAIN) == "Question: q\nAnswer:"
    _check(model, tok, template=PLAIN)


def test_long_contexts_are_cut_to_the_model_positions(tiny):
    model, tok = tiny
    long = [Question("word " * 200 + "what is the opposite of hot?", ("cold", "warm"), 0)]
    reqs = encode_requests(tok, long, max_length=40)
    assert all(len(r.context) + len(r.continuation) - 1 <= 40 for r in reqs)
    scores = multiple_choice_scores(model, tok, long)  # the tiny llama has 64 positions
    assert set(scores) == {"mc_accuracy", "mc_accuracy_norm", "mc_s"}
    with pytest.raises(ValueError, match="more than the model's 3 positions"):
        encode_requests(tok, QUESTIONS[:1], max_length=3)


# ----- question files ----------------------------------------------------------------------
def test_jsonl_answers_as_index_letter_or_text(tmp_path):
    rows = [{"question": "2 + 2?", "choices": ["3", "4", "5"], "answer": 1},
            {"question": "opposite of hot?", "choices": ["warm", "cold"], "answer": "B"},
            {"question": "a fruit?", "choices": ["chair", "apple", "lamp", "car"], "answer": "apple"},
            {"question": "3 + 1?", "choices": ["2", "3", "4"], "answer": "4"}]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    qs = load_choice_file(str(path))
    assert [q.answer for q in qs] == [1, 1, 1, 2]  # "4" is a choice's text here, not an index
    assert qs[2].choices == ("chair", "apple", "lamp", "car")
    assert load_questions(str(path), 2, seed=0) == qs[:2]


def test_csv_in_mmlu_shape_with_and_without_header(tmp_path):
    path = tmp_path / "mmlu.csv"
    path.write_text('question,A,B,C,D,answer\n"What is 2 + 2, roughly?",3,4,5,,B\n'
                    "Which is red?,sky,grass,blood,snow,2\n")
    qs = load_choice_file(str(path))
    assert qs[0] == Question("What is 2 + 2, roughly?", ("3", "4", "5"), 1)  # an empty D cell is dropped
    assert qs[1].answer == 2  # digits in a CSV cell: an index
    raw = tmp_path / "mmlu_test.csv"  # the original MMLU files have no header row
    raw.write_text("Which is red?,sky,grass,blood,snow,C\n")
    assert load_choice_file(str(raw)) == [Question("Which is red?", ("sky", "grass", "blood", "snow"), 2)]
    listed = tmp_path / "listed.csv"
    listed.write_text('question,choices,answer\nopposite of up?,"[""down"", ""left""]",down\n')
    assert load_choice_file(str(listed)) == [Question("opposite of up?", ("down", "left"), 0)]


@pytest.mark.parametrize("name, text, match", [
    ("nocol.csv", "question,A,B,C,D\nq,a,b,c,d\n", r"nocol.csv: missing column answer"),
    ("noq.jsonl", '{"choices": ["a", "b"], "answer": 0}\n', r"noq.jsonl: line 1 has no 'question'"),
    ("bad.jsonl", '{"question": "q", "choices": ["a", "b"], "answer": 0}\n'
                  '{"question": "q", "choices": ["a", "b"], "answer": "c"}\n',
     r"bad.jsonl: line 2: answer 'c' is not among the choices"),
    ("range.jsonl", '{"question": "q", "choices": ["a", "b"], "answer": 2}\n', r"index 2 is out of range"),
    ("one.csv", "question,A,B,answer\nq,only,,A\n", r"one.csv: line 2: a question needs at least 2 choices"),
    ("q.txt", "x", r"unsupported file type '.txt'"),
])
def test_bad_files_are_named_with_the_problem(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=match):
        load_choice_file(str(path))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"eval.multiple_choice: file not found: .*nope.jsonl"):
        load_questions(str(tmp_path / "nope.jsonl"), 10, seed=0)


# ----- built-in set ------------------------------------------------------------------------
def test_builtin_set_is_deterministic_balanced_and_well_formed():
    a, b = generate(120, seed=3), generate(120, seed=3)
    assert a == b and a != generate(120, seed=4)
    assert load_questions("builtin", 120, seed=3) == a
    counts = {c: sum(q.category == c for q in a) for c in CATEGORIES}
    assert set(counts.values()) == {20}
    for q in a:
        assert len(set(q.choices)) == len(q.choices) == (2 if q.category == "sentiment" else 4)
        assert 0 <= q.answer < len(q.choices)
        if q.category != "sentiment":  # the question does not give the answer away
            assert q.choices[q.answer] not in q.question.split()
    positions = [q.answer for q in a if q.category != "sentiment"]
    assert len(set(positions)) == 4 and max(np.bincount(positions)) < 0.4 * len(positions)
    assert generate(10, seed=0, categories=["plural"])[0].category == "plural"


# ----- the evaluator -----------------------------------------------------------------------
def test_evaluator_scores_multiple_choice_on_generation_rounds(tmp_path):
    from fedpeft.data import builtin_instructions
    from fedpeft.data.instruction_task import tokenize_instructions
    from fedpeft.data.prepared import PreparedTask
    from fedpeft.data.prompts import pad_id, special_ids
    from fedpeft.evaluation import Evaluator

    raw = {"model": {**TINY, "max_length": 48}, "sim": {"num_clients": 2, "clients_per_round": 2, "rounds": 2},
           "eval": {"generate_every": 0, "generate_examples": 3, "max_new_tokens": 2,
                    "multiple_choice_examples": 8}}
    cfg = validate(raw)
    assert cfg.eval.multiple_choice == "builtin"
    tok = load_tokenizer(cfg.model)
    test = tokenize_instructions(builtin_instructions.generate(6, seed=0), tok, cfg)
    task = PreparedTask(train=test, test=test, partitions=[[0], [1]], label_names=[], pad_token_id=pad_id(tok),
                        kind="causal-lm", eos_token_id=special_ids(tok)[1])
    ev = Evaluator(cfg, task)
    assert len(ev.questions) == 8
    model = build_model(cfg, 0)
    first = ev(model, 0)
    assert {"mc_accuracy", "mc_accuracy_norm", "mc_s", "rouge_l"} <= set(first)
    assert "mc_accuracy" not in ev(model, 1)  # not a generation round
    with torch.no_grad():
        model.get_base_model().lm_head.weight.add_(torch.randn_like(model.get_base_model().lm_head.weight))
    last = ev(model, 2)
    assert "mc_accuracy" in last and ev.first_samples is not ev.samples and len(ev.first_samples) == 3
    off = validate({**raw, "eval": {**raw["eval"], "multiple_choice": ""}})
    assert "mc_accuracy" not in Evaluator(off, task)(model, 0)
    with pytest.raises(DataError, match="file not found"):
        Evaluator(validate({**raw, "eval": {"multiple_choice": str(tmp_path / "none.csv")}}), task)
