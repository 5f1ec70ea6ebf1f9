"""Using a fine-tuned model folder: `lmforge predict`, and the task scores `lmforge eval` reports
(evaluate/tasks.py calls them).

The folder's task.json says what the model is for and how its inputs are built, so the same
texts become the same ids here as during fine-tuning.
"""

from __future__ import annotations

import json

from lmforge.errors import LmforgeError
from lmforge.finetune import classify, instruct, qa
from lmforge.finetune.tabular import Row, read_rows
from lmforge.model_folder import load_model, read_task

BATCH_SIZE = 32


def load_task_model(folder):
    """(model, tokenizer, task) of a fine-tuned folder; a plain language model is an error."""
    task = read_task(folder)
    if task is None:
        raise LmforgeError(f"{folder} is a language model with no task; fine-tune it with --task, "
                           "or use generate / eval --data TEXT")
    model, tokenizer = load_model(folder)
    if task["task"] == "qa":  # a Hugging Face QA folder names no windows: BERT's recipe, within this model's window
        task = {"doc_stride": min(qa.DOC_STRIDE, model.max_input_tokens // 4),
                "max_answer_tokens": qa.MAX_ANSWER_TOKENS, **task}
    if task["task"] == "classify" and model.config.n_labels != len(task["labels"]):
        raise LmforgeError(f"{folder}: task.json names {len(task['labels'])} labels but the model has "
                           f"{model.config.n_labels}")
    return model, tokenizer, task


def classify_texts(model, tokenizer, task: dict, texts: list[str], pairs: list[str] | None = None,
                   batch_size: int = BATCH_SIZE) -> list[list[dict]]:
    """For each text, every label with its probability, most likely first (the shape of
    transformers' text-classification pipeline with top_k=None)."""
    encoded = classify.encode(tokenizer, texts, pairs, model.max_input_tokens, model.config.arch, task["template"])
    examples = [classify.Example(ids, types, -1) for ids, types in encoded]
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    probabilities = classify.class_probabilities(model, examples, batch_size, pad_id)
    results = []
    for row in probabilities.tolist():
        ranked = sorted(range(len(row)), key=lambda i: (-row[i], i))
        results.append([{"label": task["labels"][i], "score": row[i]} for i in ranked])
    return results


def predict_file(model, tokenizer, task: dict, path, batch_size: int = BATCH_SIZE) -> list[dict]:
    """Predictions for every row of a TSV/CSV/JSONL/TXT file (labels, if present, are ignored)."""
    rows = read_rows(path)
    if not rows:
        raise LmforgeError(f"{path} has no rows")
    columns = classify.find_columns(rows, path, task.get("text_column"), task.get("text_pair_column"),
                                    need_label=False)
    texts, pairs = _texts(rows, columns, path)
    scores = classify_texts(model, tokenizer, task, texts, pairs, batch_size)
    return [{"line": row.line, "text": text, **({"text_pair": pairs[i]} if pairs else {}), "label": s[0]["label"],
             "scores": s} for i, (row, text, s) in enumerate(zip(rows, texts, scores, strict=True))]


def _texts(rows: list[Row], columns: classify.Columns, path) -> tuple[list[str], list[str] | None]:
    texts = []
    for row in rows:
        text = row.fields.get(columns.text)
        if not isinstance(text, str):
            raise LmforgeError(f"{path}, line {row.line}: no text in column {columns.text!r}")
        texts.append(text)
    pairs = [str(row.fields.get(columns.pair) or "") for row in rows] if columns.pair else None
    return texts, pairs


def answer_questions(model, tokenizer, task: dict, questions: list[qa.Question], batch_size: int = BATCH_SIZE,
                     max_answer_tokens: int | None = None) -> list[dict]:
    """Each question's best answer: {id, answer, start, end, score}, offsets in characters of its context."""
    windows = qa.build_windows(questions, tokenizer, model.max_input_tokens, model.config.arch, task["template"],
                               task["doc_stride"], with_labels=False)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    return qa.answer(model, questions, windows, batch_size, pad_id, max_answer_tokens or task["max_answer_tokens"])[0]


def _qa_file(path) -> list[qa.Question]:
    """Questions from a SQuAD JSON file, or from rows with `question` and `context` columns."""
    if str(path).endswith(".json"):
        questions, _ = qa.read_squad(path, need_answers=False)
        return questions
    rows = read_rows(path)
    missing = [row.line for row in rows if not all(isinstance(row.fields.get(k), str) for k in ("question", "context"))]
    if missing:
        raise LmforgeError(f"{path}, line {missing[0]}: a QA input needs the fields question and context")
    return [qa.Question(str(row.fields.get("id", row.line)), row.fields["question"], row.fields["context"], [])
            for row in rows]


def evaluate_qa(model, tokenizer, task: dict, paths: list[str], batch_size: int = BATCH_SIZE) -> dict:
    """SQuAD's exact match and F1 over every question of the files (each against all its answers)."""
    questions, notes = qa.read_answerable(paths)
    windows = qa.build_windows(questions, tokenizer, model.max_input_tokens, model.config.arch, task["template"],
                               task["doc_stride"])
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    return {**qa.score(model, questions, windows, batch_size, pad_id, task["max_answer_tokens"]), "skipped": notes}


def evaluate_file(model, tokenizer, task: dict, paths: list[str], batch_size: int = BATCH_SIZE) -> dict:
    """A task model's metrics on files of its kind of rows: a classifier's accuracy and macro-F1 on
    labelled rows, a QA model's exact match and F1, an instruction-tuned model's loss and
    perplexity on its answers. Rows it cannot score are counted and reported."""
    if task["task"] == "qa":
        return evaluate_qa(model, tokenizer, task, paths, batch_size)
    examples, notes = [], []
    for path in paths:
        rows = read_rows(path)
        if task["task"] == "instruct":
            found, skipped = instruct.build_examples(rows, tokenizer, task["chat_template"], model.max_input_tokens,
                                                     path)
        else:
            columns = classify.find_columns(rows, path, task.get("text_column"), task.get("text_pair_column"),
                                            task.get("label_column"))
            found, skipped = classify.build_examples(rows, columns, task["labels"], tokenizer,
                                                     model.max_input_tokens, model.config.arch, task["template"],
                                                     path)
        examples += found
        if skipped.count:
            notes.append(skipped.summary())
    if not examples:
        raise LmforgeError("; ".join(notes) or "no rows to score")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    scorer = instruct.score if task["task"] == "instruct" else classify.score
    return {**scorer(model, examples, batch_size, pad_id), "skipped": notes}


def predict_command(args) -> int:
    """`lmforge predict MODEL_DIR (--input FILE | --text TEXT [--text-pair TEXT] | --question Q --context C)`."""
    if getattr(args, "question", None) is not None or getattr(args, "context", None) is not None:
        return _predict_answers(args)
    if (args.input is None) == (args.text is None):
        raise LmforgeError("give exactly one of --input FILE or --text TEXT")
    if args.text_pair is not None and args.text is None:
        raise LmforgeError("--text-pair goes with --text")
    if args.batch_size < 1:
        raise LmforgeError(f"--batch-size must be at least 1; got {args.batch_size}")
    model, tokenizer, task = load_task_model(args.model_dir)
    if task["task"] == "qa":
        return _predict_answers(args, model, tokenizer, task)
    if task["task"] != "classify":
        raise LmforgeError(f"predict does not know task {task['task']!r} yet")
    if args.input is not None:
        results = predict_file(model, tokenizer, task, args.input, args.batch_size)
    else:
        pairs = [args.text_pair] if args.text_pair is not None else None
        scores = classify_texts(model, tokenizer, task, [args.text], pairs)[0]
        results = [{"text": args.text, **({"text_pair": args.text_pair} if pairs else {}),
                    "label": scores[0]["label"], "scores": scores}]
    for result in results:
        if args.json:
            print(json.dumps(result, ensure_ascii=False))
        else:
            ranked = "  ".join(f"{s['label']} {s['score']:.4f}" for s in result["scores"])
            print(f"{result['label']}\t{ranked}")
    return 0


def _predict_answers(args, model=None, tokenizer=None, task=None) -> int:
    """predict on a QA folder: the answer to --question in --context, or to every question of --input."""
    given = args.question is not None or args.context is not None
    if given and (args.question is None or args.context is None or args.input is not None or args.text is not None):
        raise LmforgeError("--question and --context go together, without --input or --text")
    if not given and args.input is None:
        raise LmforgeError("a QA model answers --question Q --context C, or the questions of --input FILE")
    if args.max_answer_tokens is not None and args.max_answer_tokens < 1:
        raise LmforgeError(f"--max-answer-tokens must be at least 1; got {args.max_answer_tokens}")
    if model is None:
        model, tokenizer, task = load_task_model(args.model_dir)
    if task["task"] != "qa":
        raise LmforgeError(f"{args.model_dir} is a {task['task']} model; --question and --context need a QA model")
    questions = [qa.make_question(args.question, args.context)] if given else _qa_file(args.input)
    for result in answer_questions(model, tokenizer, task, questions, args.batch_size, args.max_answer_tokens):
        if args.json:
            print(json.dumps(result, ensure_ascii=False))
        else:
            print(f"{result['answer']}\t{result['score']:.4f}\t{result['start']}:{result['end']}")
    return 0
