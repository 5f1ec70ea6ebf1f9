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
from lmforge.finetune.predict import answer_questions
from lmforge.finetune.run import prepare_task_run
from lmforge.interop import hf_task, to_hf
from lmforge.model import LanguageModel, SpanExtractor
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
    torch.testing.assert_close(mine[..., 0], ref.start_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(mine[..., 1], ref.end_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(back.start_logits, ref.start_logits, atol=1e-5, rtol=0)
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
