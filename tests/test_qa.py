"""Extractive question answering: SQuAD files, windows over long contexts, the best span, the
span head across the Hugging Face border (BertForQuestionAnswering both ways), and the
`finetune --task qa` → `predict` → `eval` path.

The Hugging Face reference is computed as transformers' removed question-answering pipeline did:
the tokenizer's own windows (truncation="only_second", stride, offsets), the model's start and end
logits, the best span by start + end logit among context tokens (end >= start, at most
max_answer_len tokens), cut out of the text through the offsets.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from helpers import one_thread, read_metrics, token_cache  # noqa: F401  (one_thread, token_cache: autouse)
from test_interop import _perturb, wordpiece
from tokenizers import processors

from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.finetune import qa
from lmforge.finetune.predict import answer_questions, evaluate_file
from lmforge.finetune.run import prepare_task_run
from lmforge.interop import hf_task, to_hf
from lmforge.model import LanguageModel, SpanExtractor
from lmforge.model.transformer import ModelOutput
from lmforge.model_folder import load_model, read_task, save_model
from lmforge.tokenize import Tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

COLORS = ["red", "blue", "green", "black", "white", "yellow", "brown", "grey"]
THINGS = ["car", "house", "boat", "door", "hat", "cup", "kite", "ball"]
FILLER = "the town was quiet and the river ran slowly past the old mill where nobody lived"


def toy_questions(n: int, seed: int, filler_words: int = 6, facts: int = 3) -> list[dict]:
    """SQuAD-style paragraphs: 'the car is red . the boat is blue .' and 'what color is the boat ?'."""
    rng = random.Random(seed)
    paragraphs = []
    for p in range(n):
        things = rng.sample(THINGS, facts)
        colors = [rng.choice(COLORS) for _ in things]
        words = FILLER.split()
        pieces = []
        for thing, color in zip(things, colors, strict=True):
            pieces.append(" ".join(rng.sample(words, filler_words)) + f" . the {thing} is {color} .")
        context = " ".join(pieces)
        k = rng.randrange(facts)
        start = context.index(f"the {things[k]} is ") + len(f"the {things[k]} is ")
        qas = [{"id": f"q{seed}-{p}", "question": f"what color is the {things[k]} ?",
                "answers": [{"text": colors[k], "answer_start": start}]}]
        paragraphs.append({"context": context, "qas": qas})
    return [{"title": "toy", "paragraphs": paragraphs}]


def write_squad(path: Path, articles: list[dict]) -> Path:
    path.write_text(json.dumps({"version": "1.1", "data": articles}), encoding="utf-8")
    return path


@pytest.fixture()
def base_folder(tmp_path) -> Path:
    """A random lmforge encoder with a char tokenizer (no template of its own: lmforge's is used)."""
    paragraphs = [p for a in toy_questions(50, 0) for p in a["paragraphs"]]
    texts = [p["context"] + " " + q["question"] for p in paragraphs for q in p["qas"]]
    tokenizer = Tokenizer.train("char", texts)
    config = ModelConfig(arch="encoder", vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=48,
                         block_size=160, type_vocab_size=2, pad_token_id=tokenizer.pad_id,
                         eos_token_id=tokenizer.eos_id, mask_token_id=tokenizer.mask_id)
    torch.manual_seed(0)
    save_model(LanguageModel(config), tmp_path / "base", tokenizer)
    return tmp_path / "base"


def qa_options(tmp_path: Path, base: Path, out: str = "qa", **overrides) -> dict:
    train = write_squad(tmp_path / "train.json", toy_questions(400, 1, facts=1))  # one color to find: seconds to learn
    val = write_squad(tmp_path / "val.json", toy_questions(40, 2, facts=1))
    options = dict(task="qa", init=str(base), data=[str(train)], val_data=[str(val)], out=str(tmp_path / out),
                   batch_size=16, lr=3e-3, warmup_steps=10, max_steps=150, eval_every=75, save_every=75,
                   seed=3, progress=False, bf16=False, doc_stride=32)
    return {**options, **overrides}


# ---------------------------------------------------------------- reading SQuAD


def test_read_squad_skips_and_names_questions_whose_answer_is_not_in_the_context(tmp_path):
    articles = toy_questions(3, 5)
    paragraphs = articles[0]["paragraphs"]
    paragraphs[1]["qas"][0]["answers"][0]["answer_start"] += 1  # points one character off
    paragraphs[2]["qas"][0]["answers"] = []
    path = write_squad(tmp_path / "s.json", articles)
    questions, skipped = qa.read_squad(path)
    assert [q.id for q in questions] == ["q5-0"]
    assert skipped.count == 2
    assert "q5-1" in skipped.summary() and "q5-2" in skipped.summary() and "questions" not in skipped.summary()
    assert "not inside its context" in skipped.summary()
    everyone, _ = qa.read_squad(path, need_answers=False)  # evaluation keeps them: the gold texts still score
    assert [q.id for q in everyone] == ["q5-0", "q5-1", "q5-2"] and everyone[1].answer_start is None


@pytest.mark.parametrize("content,message", [("{", "is not SQuAD JSON"), ('{"data": 3}', "expected")])
def test_a_file_that_is_not_squad_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(LmforgeError, match=message):
        qa.read_squad(path)


# ---------------------------------------------------------------- windows


def test_windows_overlap_by_the_stride_and_every_answer_maps_back_to_its_text(base_folder):
    _, tokenizer = load_model(base_folder)
    questions, _ = qa.read_squad(write_squad(base_folder / "s.json", toy_questions(30, 7, filler_words=14)))
    windows = qa.build_windows(questions, tokenizer, 64, "encoder", "lmforge", doc_stride=10)
    assert len(windows) > 2 * len(questions)  # contexts of ~200 characters in windows of 64 tokens
    for index, question in enumerate(questions):
        mine = [w for w in windows if w.question == index]
        assert all(len(w.input_ids) <= 64 for w in mine)
        spans = [[s for s in w.offsets if s is not None] for w in mine]
        for before, after in zip(spans, spans[1:], strict=False):
            assert before[-10:] == after[:10]  # consecutive pieces share doc_stride tokens
        assert spans[0][0][0] == 0 and spans[-1][-1][1] == len(question.context)
        labelled = [w for w in mine if w.start > 0]
        assert labelled, "the answer lies whole inside some window"
        for w in labelled:
            found = question.context[w.offsets[w.start][0]:w.offsets[w.end][1]]
            assert found == question.answers[0]
        assert all(w.start == w.end == 0 for w in mine if w not in labelled)


def test_a_stride_that_leaves_no_room_is_refused(base_folder):
    _, tokenizer = load_model(base_folder)
    questions, _ = qa.read_squad(write_squad(base_folder / "s.json", toy_questions(2, 7)))
    with pytest.raises(LmforgeError, match="lower --doc-stride"):
        qa.build_windows(questions, tokenizer, 64, "encoder", "lmforge", doc_stride=60)


def test_best_span_is_the_brute_force_best_valid_context_span():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = 12
        start, end = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
        offsets = [None, None, None] + [(k, k + 1) for k in range(n - 4)] + [None]
        longest = 1 + trial % 4
        got = qa.best_span(start, end, offsets, longest)
        best = max((float(start[s] + end[e]), s, e) for s in range(3, n - 1) for e in range(s, min(s + longest, n - 1)))
        assert got[1:] == best[1:] and got[0] == pytest.approx(best[0])


# ---------------------------------------------------------------- Hugging Face, both ways

BERT_TEXT = " ".join(FILLER.split() + COLORS + THINGS + ["what", "color", "is", "the", "?", "."])


@pytest.fixture(scope="module")
def bert_qa(tmp_path_factory):
    """A random BertForQuestionAnswering folder with a [CLS] q [SEP] c [SEP] WordPiece tokenizer."""
    inner = wordpiece(BERT_TEXT)
    inner.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    config = transformers.BertConfig(
        vocab_size=inner.get_vocab_size(), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=48, initializer_range=0.3, hidden_act="gelu_new")
    torch.manual_seed(0)
    model = transformers.BertForQuestionAnswering(config).eval()
    _perturb(model)
    folder = tmp_path_factory.mktemp("bert-qa")
    model.save_pretrained(folder)
    hf_tokenizer = transformers.BertTokenizerFast(tokenizer_object=inner)
    hf_tokenizer.save_pretrained(folder)
    return model, hf_tokenizer, folder


def reference_answers(model, tokenizer, questions, max_length: int, stride: int, max_answer_len: int) -> list[tuple]:
    """(answer text, character start) for each question, the question-answering pipeline's way."""
    answers = []
    for q in questions:
        enc = tokenizer(q.question, q.context, truncation="only_second", max_length=max_length, stride=stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True)
        best = None
        for i, ids in enumerate(enc["input_ids"]):
            with torch.no_grad():
                out = model(torch.tensor([ids]), token_type_ids=torch.tensor([enc["token_type_ids"][i]]))
            start, end = out.start_logits[0], out.end_logits[0]
            context = [k for k, s in enumerate(enc.sequence_ids(i)) if s == 1]
            for s in context:
                for e in context:
                    if s <= e < s + max_answer_len:
                        value = float(start[s] + end[e])
                        if best is None or value > best[0]:
                            offsets = enc["offset_mapping"][i]
                            best = (value, offsets[s][0], offsets[e][1])
        answers.append((q.context[best[1]:best[2]], best[1]))
    return answers


def test_a_converted_bert_qa_folder_gives_the_reference_answers(bert_qa, tmp_path):
    hf_model, hf_tokenizer, folder = bert_qa
    assert hf_task(folder) == {"task": "qa", "template": "tokenizer"}
    model, tokenizer = load_model(folder)
    assert isinstance(model, SpanExtractor)
    articles = toy_questions(12, 11, filler_words=10)
    questions, _ = qa.read_squad(write_squad(tmp_path / "q.json", articles), need_answers=False)
    task = {"task": "qa", "template": "tokenizer", "doc_stride": 8, "max_answer_tokens": 4}
    ours = answer_questions(model, tokenizer, task, questions, batch_size=5)
    reference = reference_answers(hf_model, hf_tokenizer, questions, max_length=48, stride=8, max_answer_len=4)
    assert [(r["answer"], r["start"]) for r in ours] == reference
    assert len({r["answer"] for r in ours}) > 3  # a random model's answers vary: the test can tell them apart
    assert all(0 < r["score"] <= 1 for r in ours)
    windows = qa.build_windows(questions, tokenizer, 48, "encoder", "tokenizer", 8)
    assert len(windows) > len(questions)  # the contexts did need several windows


def test_bert_qa_exports_back_with_the_same_logits(bert_qa, tmp_path):
    hf_model, _, folder = bert_qa
    model, tokenizer = load_model(folder)
    out = to_hf(model, tokenizer, tmp_path / "back", task=read_task(folder))
    again = transformers.AutoModelForQuestionAnswering.from_pretrained(out).eval()
    assert type(again).__name__ == "BertForQuestionAnswering"
    ids = torch.randint(5, hf_model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    types = torch.zeros_like(ids)
    types[:, 8:] = 1
    with torch.no_grad():
        ref = hf_model(ids, token_type_ids=types)
        back = again(ids, token_type_ids=types)
        mine = model(ids, token_type_ids=types).logits
    torch.testing.assert_close(mine[..., 0], ref.start_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine[..., 1], ref.end_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back.start_logits, ref.start_logits, atol=1e-5, rtol=1e-5)
    assert ref.start_logits.std() > 0.1


def test_span_loss_equals_transformers_on_unpadded_windows(bert_qa):
    hf_model, _, folder = bert_qa
    model, _ = load_model(folder)
    ids = torch.randint(5, hf_model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    starts, ends = torch.tensor([1, 5, 0, 9]), torch.tensor([3, 5, 0, 12])
    with torch.no_grad():
        ref = hf_model(ids, start_positions=starts, end_positions=ends).loss
        mine = model(ids, start_positions=starts, end_positions=ends).loss
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- fine-tuning, predict, eval


def test_an_encoder_learns_to_answer_and_the_folder_remembers_its_task(tmp_path, base_folder):
    run = prepare_task_run(qa_options(tmp_path, base_folder))
    before = run.trainer.evaluate()
    summary = run.trainer.fit()
    assert before["f1"] < 30 and summary["val"]["f1"] >= 90, (before, summary["val"])
    task = read_task(tmp_path / "qa")
    assert task == {"task": "qa", "template": "lmforge", "doc_stride": 32, "max_answer_tokens": 30}
    model, _ = load_model(tmp_path / "qa")
    assert model.config.span_head and isinstance(model, SpanExtractor)


def test_predict_and_eval_on_a_qa_folder(tmp_path, base_folder, capsys):
    prepare_task_run(qa_options(tmp_path, base_folder)).trainer.fit()
    capsys.readouterr()
    out = str(tmp_path / "qa")
    context = "the town was quiet and the river ran slowly . the kite is green ."
    assert main(["predict", out, "--question", "what color is the kite ?", "--context", context, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["answer"] == "green" and context[result["start"]:result["end"]] == "green"
    assert main(["eval", out, "--data", str(tmp_path / "val.json"), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["questions"] == 40 and scores["f1"] >= 90 and scores["exact_match"] <= scores["f1"]
    assert main(["predict", out, "--input", str(tmp_path / "val.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 40 and all(line.split("\t")[0] in COLORS for line in lines)


def test_qa_run_resumes_exactly(tmp_path, base_folder):
    options = qa_options(tmp_path, base_folder, out="whole", max_steps=16, eval_every=8, save_every=8, dropout=0.1,
                         log_every=1)
    whole = prepare_task_run(options).trainer
    whole.fit()
    prepare_task_run({**options, "out": str(tmp_path / "split")}).trainer.fit(until=8)
    resumed = prepare_task_run({"task": "qa", "out": str(tmp_path / "split"), "resume": True})
    assert resumed.resumed and resumed.trainer.step == 8
    resumed.trainer.fit()
    losses = [[(r["step"], r["loss"]) for r in read_metrics(tmp_path / name, "train")] for name in ("split", "whole")]
    assert losses[0] == losses[1] and len(losses[0]) == 16
    assert read_metrics(tmp_path / "split", "val") == read_metrics(tmp_path / "whole", "val")
    for a, b in zip(whole.model.parameters(), resumed.trainer.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("extra,message", [
    (["--doc-stride", "-1"], "--doc-stride must be >= 0"),
    (["--doc-stride", "150"], "lower --doc-stride"),
    (["--max-answer-tokens", "0"], "--max-answer-tokens must be at least 1"),
])
def test_bad_qa_flags_are_one_line_and_exit_2(tmp_path, base_folder, capsys, extra, message):
    options = qa_options(tmp_path, base_folder)
    argv = ["finetune", "--task", "qa", "--model", str(base_folder), "--data", options["data"][0],
            "--out", str(tmp_path / "x"), "--max-steps", "1", "--no-progress", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_no_usable_question_is_one_line_and_exit_2(tmp_path, base_folder, capsys):
    articles = toy_questions(5, 1)
    for p in articles[0]["paragraphs"]:
        p["qas"][0]["answers"][0]["text"] = "purple"
    path = write_squad(tmp_path / "bad.json", articles)
    assert main(["finetune", "--task", "qa", "--model", str(base_folder), "--data", str(path),
                 "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "skipped 5 question(s)" in err and "not inside its context" in err and err.count("\n") == 1


def test_predict_needs_question_and_context_together(tmp_path, base_folder, capsys):
    assert main(["predict", str(base_folder), "--question", "why?"]) == 2
    assert "--question and --context go together" in capsys.readouterr().err


# ---------------------------------------------------------------- what the tests above let through


class Pointer(torch.nn.Module):
    """A stand-in span model that points where it is told: {token id: logit} for starts and for
    ends, 0 for every other token (qa.answer needs nothing more of a model)."""

    def __init__(self, starts: dict[int, float], ends: dict[int, float]):
        super().__init__()
        self.config = ModelConfig(arch="encoder", vocab_size=8, type_vocab_size=0)
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.starts, self.ends = starts, ends

    def forward(self, input_ids, attention_mask=None, start_positions=None, end_positions=None, **_):
        logits = torch.zeros(*input_ids.shape, 2)
        for column, wanted in enumerate((self.starts, self.ends)):
            for token, value in wanted.items():
                logits[..., column] += (input_ids == token).float() * value
        return ModelOutput(logits, torch.zeros(()))


@pytest.mark.parametrize("arch,template", [("encoder", "lmforge"), ("decoder", "lmforge"), ("encoder", "tokenizer")])
def test_every_window_offset_names_the_characters_of_its_own_token(base_folder, arch, template):
    _, tokenizer = load_model(base_folder)
    if template == "tokenizer":
        eos = "<|endoftext|>"  # the tokenizer's own template, BERT's shape with lmforge's separator
        tokenizer.inner.post_processor = processors.TemplateProcessing(
            single=f"{eos} $A {eos}", pair=f"{eos} $A {eos} $B:1 {eos}:1", special_tokens=[(eos, tokenizer.eos_id)])
    questions, _ = qa.read_squad(write_squad(base_folder / "s.json", toy_questions(6, 7, filler_words=14)))
    windows = qa.build_windows(questions, tokenizer, 64, arch, template, doc_stride=10)
    for window in windows:
        context = questions[window.question].context
        assert len(window.offsets) == len(window.input_ids) == len(window.token_type_ids)
        whole = tokenizer.inner.encode(context, add_special_tokens=False)
        id_at = dict(zip(whole.offsets, whole.ids, strict=True))
        inside = [k for k, span in enumerate(window.offsets) if span is not None]
        assert inside == list(range(inside[0], inside[-1] + 1))  # one run of context tokens
        assert all(window.input_ids[k] == id_at[window.offsets[k]] for k in inside)
        assert all(window.token_type_ids[k] == 1 for k in inside)
        assert window.input_ids[inside[-1] + 1] == tokenizer.eos_id  # the closing separator, outside the context


def test_a_long_question_is_cut_to_its_first_max_question_tokens(base_folder):
    _, tokenizer = load_model(base_folder)
    long = "what color is the " + " ".join(["old"] * 40) + " kite ?"  # ~180 characters
    question = qa.make_question(long, "the kite is green . the car is red .")
    windows = qa.build_windows([question], tokenizer, 160, "encoder", "lmforge", doc_stride=16, with_labels=False)
    asked = tokenizer.inner.encode(long, add_special_tokens=False).ids
    assert len(asked) > qa.MAX_QUESTION_TOKENS and len(windows) == 1
    ids = windows[0].input_ids
    assert ids[1:1 + qa.MAX_QUESTION_TOKENS] == asked[:qa.MAX_QUESTION_TOKENS]
    assert ids[1 + qa.MAX_QUESTION_TOKENS] == tokenizer.eos_id  # then the separator, then the context


def test_a_byte_level_answer_loses_the_leading_space_its_token_carries():
    texts = ["the kite is green and the car is red ."] * 50
    tokenizer = Tokenizer.train("bpe", texts, vocab_size=300)
    green = tokenizer.inner.token_to_id("Ġgreen")
    assert green is not None  # one token, space included: what the test is about
    question = qa.make_question("what color is the kite ?", texts[0])
    windows = qa.build_windows([question], tokenizer, 32, "encoder", "lmforge", doc_stride=4, with_labels=False)
    [result], _ = qa.answer(Pointer({green: 5.0}, {green: 5.0}), [question], windows, 4, tokenizer.pad_id)
    assert result["answer"] == "green" and texts[0][result["start"]:result["end"]] == "green"


def test_an_answer_ending_on_a_space_is_trimmed_and_its_end_follows():
    context = "the kite is green ."
    tokenizer = Tokenizer.train("char", [context + " what color ?"])
    g, space = tokenizer.inner.token_to_id("g"), tokenizer.inner.token_to_id(" ")
    question = qa.make_question("what color ?", context)
    windows = qa.build_windows([question], tokenizer, 64, "encoder", "lmforge", doc_stride=4, with_labels=False)
    [result], _ = qa.answer(Pointer({g: 5.0}, {space: 5.0}), [question], windows, 4, tokenizer.pad_id,
                            max_answer_tokens=6)  # the best span is "green " (g to the space after it)
    assert (result["answer"], result["start"], result["end"]) == ("green", 12, 17)


def test_the_answer_comes_from_the_window_with_the_highest_start_plus_end_logit():
    """The first window holds "ab" three times (start + end logit 10, but a probability near 1/9),
    the last one "cd" once (8, a probability near 0.6): the logits decide, as the pipeline did."""
    tokenizer = Tokenizer.train("char", ["abcdefghijklmnopqrstuvwxyz ?."])
    question = qa.make_question("q ?", "abxabxab" + "x" * 60 + "cd")
    windows = qa.build_windows([question], tokenizer, 24, "encoder", "lmforge", doc_stride=4, with_labels=False)
    assert len(windows) > 2
    a, b, c, d = (tokenizer.inner.token_to_id(ch) for ch in "abcd")
    model = Pointer({a: 5.0, c: 4.0}, {b: 5.0, d: 4.0})
    [result], _ = qa.answer(model, [question], windows, 2, tokenizer.pad_id, max_answer_tokens=2)
    assert (result["answer"], result["start"], result["end"]) == ("ab", 0, 2)
    assert result["score"] < 0.2


def test_the_score_is_start_times_end_probability_over_the_windows_context_tokens(base_folder):
    model, tokenizer = load_model(base_folder)
    config = ModelConfig.from_dict({**model.config.to_dict(), "span_head": True})
    torch.manual_seed(1)
    model = SpanExtractor(config).eval()
    questions = [qa.make_question("what color is the kite ?", "the kite is green ."),
                 qa.make_question("what ?", "the car is red and the river ran slowly past the old mill .")]
    windows = qa.build_windows(questions, tokenizer, 160, "encoder", "lmforge", with_labels=False)
    results, _ = qa.answer(model, questions, windows, 2, tokenizer.pad_id)  # one batch: the first window is padded
    for window, result in zip(windows, results, strict=True):
        with torch.no_grad():
            ids, types = torch.tensor([window.input_ids]), torch.tensor([window.token_type_ids])
            logits = model(ids, token_type_ids=types).logits[0]
        inside = torch.tensor([span is not None for span in window.offsets])
        _, first, last = qa.best_span(logits[:, 0], logits[:, 1], window.offsets, qa.MAX_ANSWER_TOKENS)
        start_p = torch.softmax(logits[inside, 0], 0)[int(inside[:first].sum())]
        end_p = torch.softmax(logits[inside, 1], 0)[int(inside[:last].sum())]
        assert result["score"] == pytest.approx(float(start_p * end_p), rel=1e-5)


@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_the_span_loss_of_a_padded_batch_is_the_mean_of_each_window_alone(arch):
    torch.manual_seed(0)
    config = ModelConfig(arch=arch, vocab_size=40, n_layer=1, n_head=2, n_embd=32, block_size=32, span_head=True,
                         type_vocab_size=2 if arch == "encoder" else 0)
    model = SpanExtractor(config).eval()
    lengths, starts, ends = [12, 7, 9], [3, 0, 5], [6, 0, 8]
    windows = [qa.Window(torch.randint(4, 40, (n,)).tolist(), [0] * 4 + [1] * (n - 4), [None] * n, 0, s, e)
               for n, s, e in zip(lengths, starts, ends, strict=True)]
    batch = qa.collate(windows, pad_id=0, with_segments=arch == "encoder")
    assert batch["input_ids"].shape == (3, 12) and batch["attention_mask"].sum(1).tolist() == lengths
    with torch.no_grad():
        together = model(**batch)
        alone = [model(**qa.collate([w], pad_id=0, with_segments=arch == "encoder")) for w in windows]
    torch.testing.assert_close(together.loss, sum(o.loss for o in alone) / 3, atol=1e-5, rtol=0)
    _, mean_loss = qa.answer(model, [qa.make_question("q", "c")], windows, 2, pad_id=0)  # batches of 2 and 1
    assert mean_loss == pytest.approx(float(together.loss), abs=1e-5)  # the mean over windows, not batches
    for row, (n, out) in enumerate(zip(lengths, alone, strict=True)):  # right padding changes no real token's logits
        torch.testing.assert_close(together.logits[row, :n], out.logits[0], atol=1e-5, rtol=0)


def test_predict_and_eval_read_a_hugging_face_qa_folder_with_the_default_windows(bert_qa, tmp_path, capsys):
    """A converted folder has no task.json to name its --doc-stride and answer length: BERT's recipe
    applies (30 tokens; a stride of 128, at most a quarter of the window: 12 of this model's 48)."""
    _, _, folder = bert_qa
    context = "the car is red . the boat is blue . " + FILLER
    assert main(["predict", str(folder), "--question", "what color is the boat ?", "--context", context,
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    model, tokenizer = load_model(folder)
    task = {"task": "qa", "template": "tokenizer", "doc_stride": 12, "max_answer_tokens": 30}
    [expected] = answer_questions(model, tokenizer, task, [qa.make_question("what color is the boat ?", context)])
    assert got == expected and context[got["start"]:got["end"]] == got["answer"]
    path = write_squad(tmp_path / "q.json", toy_questions(4, 3))
    assert main(["eval", str(folder), "--data", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["questions"] == 4


def test_a_decoder_answers_questions_after_a_short_qa_run(tmp_path):
    paragraphs = [p for a in toy_questions(50, 0) for p in a["paragraphs"]]
    tokenizer = Tokenizer.train("char", [p["context"] + " " + q["question"] for p in paragraphs for q in p["qas"]])
    config = ModelConfig(arch="decoder", vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=32,
                         block_size=96, pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id)
    torch.manual_seed(0)
    save_model(LanguageModel(config), tmp_path / "base", tokenizer)
    run = prepare_task_run(qa_options(tmp_path, tmp_path / "base", max_steps=4, eval_every=4, save_every=4))
    assert run.model.config.arch == "decoder" and isinstance(run.model, SpanExtractor)
    summary = run.trainer.fit()
    assert summary["val"]["questions"] == 40 and 0 <= summary["val"]["f1"] <= 100
    model, tokenizer = load_model(tmp_path / "qa")
    task = read_task(tmp_path / "qa")
    context = "the town was quiet and the river ran slowly . the kite is green . the car is red ."
    [result] = answer_questions(model, tokenizer, task, [qa.make_question("what color is the kite ?", context)])
    assert result["answer"] and context[result["start"]:result["end"]] == result["answer"]


def test_a_qa_run_from_a_qa_folder_keeps_its_head_and_windows_unless_told(bert_qa, tmp_path):
    _, _, folder = bert_qa
    model, tokenizer = load_model(folder)
    save_model(model, tmp_path / "mine", tokenizer, task={"task": "qa", "template": "tokenizer", "doc_stride": 6,
                                                          "max_answer_tokens": 5})
    train = write_squad(tmp_path / "t.json", toy_questions(20, 4))
    options = dict(task="qa", init=str(tmp_path / "mine"), data=[str(train)], out=str(tmp_path / "a"), max_steps=1,
                   progress=False, bf16=False)
    run = prepare_task_run(options)
    assert {k: run.trainer.task[k] for k in ("doc_stride", "max_answer_tokens")} == {"doc_stride": 6,
                                                                                     "max_answer_tokens": 5}
    for name, value in model.state_dict().items():  # the span head too: it already answers questions
        torch.testing.assert_close(run.model.state_dict()[name], value, atol=0, rtol=0)
    told = prepare_task_run({**options, "out": str(tmp_path / "b"), "doc_stride": 9, "max_answer_tokens": 3})
    assert (told.trainer.task["doc_stride"], told.trainer.task["max_answer_tokens"]) == (9, 3)


def test_without_val_data_a_seeded_share_of_the_questions_is_held_out(tmp_path, base_folder):
    from lmforge.finetune.run import hold_out

    options = qa_options(tmp_path, base_folder, val_data=None, val_fraction=0.1, max_steps=1)
    run = prepare_task_run(options)
    val = run.trainer.val_questions
    assert len(val) == 40 and len(run.trainer.train_store) == 360  # one window per short question
    again = prepare_task_run({**options, "out": str(tmp_path / "again")}).trainer.val_questions
    assert [q.id for q in again] == [q.id for q in val]  # seeded
    train, kept = hold_out(list(range(400)), run.trainer.config, "questions")
    assert sorted(train + kept) == list(range(400)) and len(kept) == 40 and not set(train) & set(kept)
    torch.manual_seed(123)  # the split is the run's seed's, whatever the global generator has drawn
    assert hold_out(list(range(400)), run.trainer.config, "questions") == (train, kept)


def test_a_prompt_tuned_qa_model_reads_windows_that_leave_the_prompt_room(tmp_path):
    """Learned positions end at block_size: with 4 prompt vectors, windows hold 60 tokens, in training,
    evaluation and predict alike."""
    paragraphs = [p for a in toy_questions(50, 0) for p in a["paragraphs"]]
    tokenizer = Tokenizer.train("char", [p["context"] + " " + q["question"] for p in paragraphs for q in p["qas"]])
    config = ModelConfig(arch="encoder", vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=32,
                         block_size=64, position="learned", type_vocab_size=2, pad_token_id=tokenizer.pad_id,
                         eos_token_id=tokenizer.eos_id, mask_token_id=tokenizer.mask_id)
    torch.manual_seed(0)
    save_model(LanguageModel(config), tmp_path / "base", tokenizer)
    long = write_squad(tmp_path / "long.json", toy_questions(6, 2, filler_words=14))  # ~250 characters each
    options = qa_options(tmp_path, tmp_path / "base", val_data=[str(long)], prompt_tuning=4, doc_stride=8,
                         max_steps=2, eval_every=2, save_every=2)
    run = prepare_task_run(options)
    assert max(len(w.input_ids) for w in run.trainer.val_store) == 60
    run.trainer.fit()
    model, tokenizer = load_model(tmp_path / "qa")
    assert model.prompt_length == 4 and model.max_input_tokens == 60
    questions, _ = qa.read_squad(long)
    for q, result in zip(questions, answer_questions(model, tokenizer, read_task(tmp_path / "qa"), questions),
                         strict=True):
        assert q.context[result["start"]:result["end"]] == result["answer"]
    assert evaluate_file(model, tokenizer, read_task(tmp_path / "qa"), [str(long)])["questions"] == 6
    assert main(["eval", str(tmp_path / "qa"), "--data", str(long), "--json"]) == 0
