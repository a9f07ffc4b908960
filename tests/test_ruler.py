"""RULER's tasks (``evaluation.ruler``): deterministic prompts of the target length in the model's tokens,
RULER's templates and scoring, and questions asked from a copied KV cache answering as the whole prompt
would. The tiny checkpoint's tokenizer and a small local essay corpus stand in for the real ones."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from selfextend import assets
from selfextend.cli import main
from selfextend.evaluation import ruler
from selfextend.evaluation.methods import applied, parse_method
from selfextend.evaluation.ruler import TASKS, Builder, make_haystack, score
from selfextend.evaluation.ruler_runner import LONG_PROMPT, PREFILL_CHUNK, _prefill, ask, prefill_chunk
from selfextend.generation import decode_tokens, end_of_sequence_tokens

from conftest import ids_of, tiny_model

SHORT_TASKS = [t for t in TASKS if t != "cwe"]  # cwe's solved example alone is ~1500 tiny-tokenizer tokens


def test_string_match_all_as_ruler_scores():
    """RULER's string_match_all: the fraction of references found, case-insensitive, per answer."""
    assert score(" 1234567.", ["1234567"]) == 1.0
    assert score("The numbers are 11, 22", ["11", "22", "33", "44"]) == 0.5
    assert score("ABCDE and fghij", ["abcde", "FGHIJ"]) == 1.0
    assert score("\x00 abc", ["ABC"]) == 1.0
    assert score("12345", ["1234567"]) == 0.0


@pytest.mark.parametrize("task", SHORT_TASKS)
def test_haystacks_are_deterministic_and_of_the_target_length(loaded, essays, task):
    _, tokenizer = loaded
    text = assets.essay_text()
    a = make_haystack(Builder(tokenizer), task, 3000, 0, 3, seed=5, essays=text)
    b = make_haystack(Builder(tokenizer), task, 3000, 0, 3, seed=5, essays=text)
    other = make_haystack(Builder(tokenizer), task, 3000, 1, 3, seed=5, essays=text)
    assert a.prefix_ids == b.prefix_ids and [q.suffix_ids for q in a.questions] == [q.suffix_ids for q in b.questions]
    assert [q.answers for q in a.questions] != [q.answers for q in other.questions]
    if TASKS[task].kind in ("niah", "vt"):
        assert a.length == 3000 and len(a.questions) == 3  # exactly the target, with the longest question
    else:
        assert 2900 < a.length <= 3000 and len(a.questions) == 1  # RULER's fit: the most words that fit


def test_needles_hold_what_the_question_expects(loaded, essays):
    _, tokenizer = loaded
    h = make_haystack(Builder(tokenizer), "niah_multivalue", 3000, 0, 2, essays=assets.essay_text())
    text = tokenizer.decode(h.prefix_ids)
    assert text.startswith(tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                           add_generation_prompt=True).split("x")[0])
    assert "Some special magic numbers are hidden within the following text." in text
    for q in h.questions:
        assert len(q.answers) == 4 and all(f"is: {v}." in text for v in q.answers)
        suffix = tokenizer.decode(q.suffix_ids)
        assert suffix.rstrip().endswith("mentioned in the provided text are")
    single = make_haystack(Builder(tokenizer), "niah_single_1", 3000, 0, 2, essays=None)
    assert "A special magic number is hidden" in tokenizer.decode(single.prefix_ids)  # RULER's singular wording
    assert tokenizer.decode(single.questions[0].suffix_ids).rstrip().endswith("text is")


def test_variable_tracking_chain_is_in_the_text(loaded):
    _, tokenizer = loaded
    h = make_haystack(Builder(tokenizer), "vt", 3000, 0, 2)
    text = tokenizer.decode(h.prefix_ids)
    for q in h.questions:
        names = q.answers
        assert len(names) == 5 and all(f"VAR {names[j + 1]} = VAR {names[j]}" in text for j in range(4))


def test_fill_places_needles_at_their_depths():
    units = [[1, 2, 3]] * 10
    ids, starts = ruler.fill(units, 40, [(0.5, [9, 9]), (0.0, [8]), (1.0, [7])])
    assert len(ids) == 40 and ids[starts[1]] == 8 and ids[starts[0]] == 9 and ids[starts[2]] == 7
    assert starts[1] == 0 and starts[2] == 39 and 15 <= starts[0] <= 21


@pytest.mark.parametrize("method", ["plain", "selfextend", "dca", "rerope"])
def test_a_question_from_a_copied_cache_answers_as_the_whole_prompt(loaded, essays, method):
    """The cache after the haystack, copied per question, gives the tokens one pass over haystack +
    question gives (greedy), so one prefill serves every question -- with SelfExtend's G and DCA's scale
    chosen for the whole prompt (the longest question's, which the prefill announces)."""
    model, tokenizer = loaded
    h = make_haystack(Builder(tokenizer), "niah_multikey_1", 1500, 0, 2, essays=assets.essay_text())
    longest = max(h.questions, key=lambda q: len(q.suffix_ids))
    with applied(model, parse_method(method), h.length):
        _ask_both_ways(model, tokenizer, h, [longest] if method != "plain" else h.questions)


def _one_pass_and_chunked(model, method, ids):
    """The logits of the last 20 of ``ids`` asked after the rest is prefilled in one pass, and in chunks
    of 40 (each from a copy of the cache): two [20, vocab] tensors."""
    prefix, question = ids[:-20], ids[-20:]

    def ask_after(cache):
        return model(torch.tensor([question]), cache=copy.deepcopy(cache)).logits[0]

    with torch.inference_mode(), applied(model, parse_method(method), len(ids)):
        return (ask_after(_prefill(model, prefix, len(ids))),
                ask_after(_prefill(model, prefix, len(ids), chunk=40)))


@pytest.mark.parametrize("method", ["plain", "linear", "yarn", "rerope", "selfextend", "string", "dca"])
def test_a_haystack_prefilled_in_chunks_continues_as_one_pass(method):
    """Past LONG_PROMPT tokens a haystack is prefilled in chunks (transformers' dense sliding-window masks
    would not fit); on a model with sliding-window layers (Gemma 3) every method but dynamic NTK then
    answers as after one pass: the question's logits from either cache agree in float64 up to the
    float32 rounding of transformers' cos/sin (which the methods that rotate keys again may meet
    differently in the two orders; dynamic NTK's difference below is 10^4 times larger)."""
    # 3x the tiny L (64); STRING's paper parameters need L > 3 W (W = 128): L = 512, past its S = 168
    L, n = (512, 400) if method == "string" else (64, 190)
    model = tiny_model("gemma3", dtype=torch.float64, max_position_embeddings=L)
    ids = ids_of(n)[0].tolist()  # chunks of 40 straddle the sliding window (24)
    assert prefill_chunk(method, LONG_PROMPT + 1) == PREFILL_CHUNK and prefill_chunk(method, LONG_PROMPT) is None
    one, chunked = _one_pass_and_chunked(model, method, ids)
    torch.testing.assert_close(chunked, one, rtol=0, atol=1e-6)


def test_dynamic_ntk_is_prefilled_in_one_pass_because_chunks_would_change_it():
    model = tiny_model("gemma3", dtype=torch.float64)
    assert prefill_chunk("dynamic", 10 * LONG_PROMPT) is None
    one, chunked = _one_pass_and_chunked(model, "dynamic", ids_of(190)[0].tolist())
    assert (chunked - one).abs().max() > 1e-3


def _ask_both_ways(model, tokenizer, h, questions):
    cache = _prefill(model, h.prefix_ids, h.length)
    eos = end_of_sequence_tokens(model, tokenizer)
    for q in questions:
        whole = []
        for step in decode_tokens(model, h.prefix_ids + q.suffix_ids, 6):
            if step.token in eos:
                break
            whole.append(step.token)
        assert ask(model, tokenizer, cache, q.suffix_ids, 6) == tokenizer.decode(whole, skip_special_tokens=True)
    assert cache.get_seq_length() == len(h.prefix_ids)  # the original cache was not extended


def test_eval_ruler_runs_resumes_and_reports(tiny, essays, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["eval", "ruler", "--model", str(tiny), "--out", str(out), "--methods", "plain,dca,selfextend",
            "--lengths", "700", "--tasks", "niah_single_2,fwe", "--questions", "2"]
    assert main(args) == 0
    assert "CPU estimate: 9 prefills and 12 questions" in capsys.readouterr().err
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 12 and {r["trial"]["task"] for r in records} == {"niah_single_2", "fwe"}
    assert all(0 <= r["score"] <= 1 for r in records)
    assert main(args) == 0  # resumed: nothing left to run
    assert "CPU estimate: 0 prefills" in capsys.readouterr().err
    assert len((out / "results.jsonl").read_text().splitlines()) == 12
    report = (out / "report.md").read_text()
    assert "## RULER" in report and "| niah_single_2 | single needle | 700 |" in report
    assert main(["eval", "ruler", "--model", str(tiny), "--out", str(out), "--tasks", "nope"]) == 2


def test_every_task_gets_as_many_questions_a_cell_and_one_question_tasks_get_more_haystacks():
    from selfextend.evaluation.methods import parse_methods
    from selfextend.evaluation.ruler_runner import ruler_trials

    methods = parse_methods("plain,dca")
    trials = ruler_trials(methods, [4096], ["niah_single_2", "cwe", "fwe"], haystacks=2, questions=5, seed=0)
    for task in ("niah_single_2", "cwe", "fwe"):
        for m in ("plain", "dca"):
            cell = [t for t in trials if t["task"] == task and t["method"] == m]
            assert len(cell) == 10 and len({(t["haystack"], t["question"]) for t in cell}) == 10
    assert {t["haystack"] for t in trials if t["task"] == "cwe"} == set(range(10))
    assert {t["haystack"] for t in trials if t["task"] == "niah_single_2"} == {0, 1}
    # a run with one haystack recorded the same first cwe trial: a larger run resumes it, not redoes it
    first = ruler_trials(methods, [4096], ["cwe"], haystacks=1, questions=1, seed=0)[0]
    assert first in trials


def test_the_estimate_is_scaled_by_what_the_folders_finished_prefills_took():
    from selfextend.evaluation.methods import parse_methods
    from selfextend.evaluation.ruler_runner import estimate, ruler_trials

    class Folder:  # the parts of experiments.Runner the estimate reads
        def __init__(self, records):
            self.records, self.done = records, {self.key(r["trial"]): r for r in records}

        key = staticmethod(lambda trial: json.dumps(trial, sort_keys=True))
        copied = staticmethod(lambda trial: None)

    fit = (0.0, 1e-3, 0.0, 0.0)  # a prefill of n tokens takes n^2 / 1000 s; answers take no time
    done = ruler_trials(parse_methods("plain"), [1000], ["niah_single_2"], haystacks=1, questions=2, seed=0)
    todo = ruler_trials(parse_methods("plain"), [2000], ["niah_single_2"], haystacks=1, questions=2, seed=0)
    assert "about 1.1 h" in estimate(todo, Folder([]), fit)  # 2000^2 / 1000 s, nothing recorded
    # the recorded 1000-token group took 3x what the fit says (1000 s): the 2000-token one is taken at 3x
    ran = [{"trial": t, "seconds": 1500.0} for t in done]
    copied = {"trial": {**done[0], "method": "selfextend"}, "seconds": 0, "same_as": "plain"}
    text = estimate(todo, Folder(ran + [copied]), fit)
    assert "1 prefills and 2 questions" in text and "about 3.3 h" in text and "x3.0 at 1000" in text


def _record(method, length, task, question, value):
    return {"trial": dict(experiment="ruler", method=method, length=length, task=task, haystack=0, sets=10,
                          question=question, seed=0), "score": value}


def test_average_is_rulers_mean_of_task_means_and_effective_length_uses_the_interval():
    from selfextend.evaluation.ruler_report import averages, effective_length, ruler_section

    records = [_record("plain", 4096, "niah_single_2", q, 1.0 if q < 8 else 0.0) for q in range(10)]
    records += [_record("plain", 4096, "niah_multivalue", q, 0.5) for q in range(10)]
    records += [_record("plain", 16384, "niah_single_2", q, 0.0) for q in range(10)]
    records += [_record("plain", 16384, "niah_multivalue", q, 0.0) for q in range(10)]
    records += [_record("dca", n, t, q, 1.0 if q < 6 else 0.0) for n in (4096, 16384)
                for t in ("niah_single_2", "niah_multivalue") for q in range(10)]
    avg = averages(records)
    assert avg[("plain", 4096)][0] == pytest.approx((0.8 + 0.5) / 2)  # mean over tasks of each task's mean
    assert avg[("plain", 4096)][4] == 20
    bars = dict.fromkeys([4096, 16384], avg[("plain", 4096)][0])
    assert effective_length(avg, "plain", [4096, 16384], bars) == "4096"  # 0/20 at 16k: interval below 0.65
    assert effective_length(avg, "dca", [4096, 16384], bars) == ">= 16384"  # 12/20: its interval reaches 0.65
    section = ruler_section(records, ["plain", "dca"])
    assert "| niah_single_2 | single needle | 16384 | 0/10 [0-28] | 6/10 [31-83] |" in section


def test_family_rows_compare_on_shared_questions_and_call_a_lead_only_without_overlap():
    from selfextend.evaluation.ruler_report import compare, family_averages, family_section

    # single needle at 4096: selfextend 10/10 on two tasks, string 0/10 on both, dca 9/10 on both
    records = [_record(m, 4096, t, q, float(q < k)) for m, k in (("selfextend@cover", 10), ("string", 0), ("dca", 9))
               for t in ("niah_single_1", "niah_single_2") for q in range(10)]
    # multi-key: only selfextend has it, so no row compares methods on questions one of them lacks
    records += [_record("selfextend@cover", 4096, "niah_multikey_1", q, 1.0) for q in range(10)]
    methods = ["selfextend@cover", "string", "dca"]
    fam = family_averages(records, methods, [4096])
    assert fam[("single needle", "string", 4096)][:1] == (0.0,) and fam[("single needle", "dca", 4096)][3] == 20
    assert ("multi-key", "selfextend@cover", 4096) not in fam
    assert compare(fam[("single needle", "selfextend@cover", 4096)], fam[("single needle", "string", 4096)]) == "leads"
    assert compare(fam[("single needle", "string", 4096)], fam[("single needle", "selfextend@cover", 4096)]) == "loses"
    assert compare(fam[("single needle", "selfextend@cover", 4096)], fam[("single needle", "dca", 4096)]) == "ties"
    table = family_section(records, methods, [4096], "selfextend@cover", ["string", "dca"])
    assert "| single needle | 4096 | 20 | 100 | 0 | 90 | leads | ties |" in table
    assert "multi-key" not in table


def test_a_length_still_running_is_averaged_on_its_tasks_against_the_bar_on_the_same_tasks():
    from selfextend.evaluation.ruler_report import ruler_section

    # 4096: two tasks (plain 8/10 and 0/10: average 40); 16384: only niah_single_2 so far
    records = [_record("plain", 4096, "niah_single_2", q, float(q < 8)) for q in range(10)]
    records += [_record("plain", 4096, "niah_multivalue", q, 0.0) for q in range(10)]
    records += [_record("plain", 16384, "niah_single_2", q, float(q < 5)) for q in range(10)]
    section = ruler_section(records, ["plain"])
    assert "| method | 4096 (2 tasks) | 16384 (1 tasks) | effective length |" in section
    # 16384 is judged against plain's 80 on niah_single_2 at 4096 (5/10's interval, 24-76, misses it), not
    # against 40 over both tasks (which it would reach): so the effective length stops at 4096
    assert "| plain | 40.0 [22-61] (20 q) | 50.0 [24-76] (10 q) | 4096 |" in section
    assert "left out of the averages of the lengths that lack them): niah_multivalue" in section


def test_other_selfextend_settings_show_per_task_and_do_not_narrow_the_averages():
    """A study setting run on one task (selfextend@f=0.75 on niah_single_2) used to make every average
    of the folder use that one task: the averages are over the tasks the methods as run by default share."""
    from selfextend.evaluation.ruler_report import ruler_section

    methods = ["plain", "selfextend@cover", "selfextend@f=0.75", "dca"]
    records = [_record(m, n, t, q, float(q < 5)) for m in ("plain", "selfextend@cover", "dca") for n in (4096, 16384)
               for t in ("niah_single_2", "niah_multivalue") for q in range(10)]
    records += [_record("selfextend@f=0.75", 16384, "niah_single_2", q, 1.0) for q in range(10)]
    section = ruler_section(records, methods)
    assert "| 4096 (2 tasks) | 16384 (2 tasks) |" in section and "| dca | 50.0 [" in section
    assert "selfextend@f=0.75 |" not in section.split("Per task (")[0]  # no average row, no family column
    assert "| niah_single_2 | single needle | 16384 | 5/10 [24-76] | 5/10 [24-76] | 10/10 [72-100] | 5/10 [24-76] |" in section
    assert "Other SelfExtend settings, measured where the per-task table shows them (not averaged): selfextend@f=0.75." in section


def test_a_method_not_run_at_a_length_does_not_empty_that_lengths_average():
    """Dynamic NTK is not run on Gemma 3 at 48k (one pass through dense masks): the others' average there
    stands on their shared tasks, and its effective length says it was not measured past 16k."""
    from selfextend.evaluation.ruler_report import ruler_section

    records = [_record(m, n, "niah_single_2", q, float(q < 5)) for m in ("plain", "dca") for n in (16384, 49152)
               for q in range(10)]
    records += [_record("dynamic", 16384, "niah_single_2", q, float(q < 5)) for q in range(10)]
    section = ruler_section(records, ["plain", "dynamic", "dca"])
    assert "| dca | 50.0 [24-76] (10 q) | 50.0 [24-76] (10 q) | >= 49152 |" in section
    assert "| dynamic | 50.0 [24-76] (10 q) | - | >= 16384 |" in section
    assert "| single needle | 49152 | 10 | 50 | - | 50 |" in section


def test_a_task_still_running_is_averaged_only_on_the_questions_every_method_has_answered():
    """A run stopped between methods (cwe: plain has answered 3 questions, dca 2) used to put cwe into the
    averages with unequal samples; only the 2 questions both answered count, and the report says so."""
    from selfextend.evaluation.ruler_report import on_shared_questions, ruler_section

    records = [_record(m, n, "niah_single_2", q, float(q < 5)) for m in ("plain", "dca") for n in (4096, 16384)
               for q in range(10)]
    records += [_record(m, 4096, "cwe", q, 1.0) for m in ("plain", "dca") for q in range(10)]
    records += [_record("plain", 16384, "cwe", q, float(q == 2)) for q in range(3)]  # plain right on the third
    records += [_record("dca", 16384, "cwe", q, 0.0) for q in range(2)]
    kept, partial = on_shared_questions(records, ["plain", "dca"])
    assert partial == {("cwe", 16384): (2, 3)}
    assert not any(r["trial"]["method"] == "plain" and r["trial"]["task"] == "cwe" and r["trial"]["question"] == 2
                   and r["trial"]["length"] == 16384 for r in kept)
    section = ruler_section(records, ["plain", "dca"])
    # both at 16384: (0.5 on niah_single_2 + 0/2 on cwe) / 2 = 25.0 over 12 questions; plain's third cwe
    # answer (right) is not in it, or plain would read (0.5 + 1/3) / 2 = 41.7 over 13 questions
    assert "| plain | 75.0 [53-89] (20 q) | 25.0 [19-68] (12 q) | 4096 |" in section
    assert "| dca | 75.0 [53-89] (20 q) | 25.0 [19-68] (12 q) | 4096 |" in section and "(13 q)" not in section
    assert "| common words | 16384 | 2 | 0 | 0 |" in section
    assert ("left out of the averages (questions every method has, of the most one has): cwe at 16384 (2 of 3)."
            in section)
    assert "| cwe | common words | 16384 | 1/3 [" in section  # the per-task table still shows every answer
