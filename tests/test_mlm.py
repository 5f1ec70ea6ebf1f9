"""Masked LM as users meet it: BERT's masking recipe, whole-word masking, segment ids, fill-mask.

Proportions are checked over many batches against binomial tolerances of 5 standard errors: a
correct implementation fails one such check about once in 1.7 million runs, while the broken
variants tried while writing these tests (80/10/10 turned into 90/0/10 or 80/0/20, words chosen
with half the probability, ...) miss by tens of standard errors; the rest (special tokens
chosen or inserted, a word split) break exact assertions. Every draw is seeded, so a run is
repeatable. fill-mask is compared with transformers' pipeline on a small random
BertForMaskedLM built here (nothing downloaded).
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import ENGLISH, PYTHON_SOURCE, one_line_error, one_thread, tiny_options, token_cache  # noqa: F401
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from lmforge.cli import build_parser, main
from lmforge.config import ModelConfig, TrainConfig
from lmforge.data.collate import IGNORE_INDEX, mask_tokens, segment_ids, word_index, word_start_table
from lmforge.errors import LmforgeError
from lmforge.fill_mask import encode, fill_mask, fill_mask_folder
from lmforge.model import LanguageModel
from lmforge.model_folder import load_model, save_model
from lmforge.tokenize import Tokenizer
from lmforge.train.objectives import Objective
from lmforge.train.pretrain import prepare_run

MASK_PROB = 0.15
DOCUMENTS = [ENGLISH, PYTHON_SOURCE] * 3  # ASCII only: each token decodes on its own to its exact text
WORDPIECE_WORDS = sorted(set(re.findall(r"[a-z]+", (ENGLISH + PYTHON_SOURCE).lower())))


def within_5_sigma(observed: float, expected: float, variance_of_mean: float) -> bool:
    return abs(observed - expected) < 5 * math.sqrt(variance_of_mean)


# --------------------------------------------------------------------------- tokenizers and token streams


@pytest.fixture(scope="module")
def char_tok() -> Tokenizer:
    return Tokenizer.train("char", DOCUMENTS)


@pytest.fixture(scope="module")
def bpe_tok() -> Tokenizer:
    return Tokenizer.train("bpe", DOCUMENTS, vocab_size=400)


@pytest.fixture(scope="module")
def wordpiece_tok() -> Tokenizer:
    """BERT's tokenizer in miniature: whole words for the common ones, "##" letters for the rest,
    BERT's normaliser, pre-tokeniser, decoder and `[CLS] $A [SEP]` template."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [*specials, *WORDPIECE_WORDS[::2], *letters, *(f"##{c}" for c in letters), *"()[]{}:.,=+\"'"]
    vocab = list(dict.fromkeys(vocab))
    inner = RustTokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    inner.normalizer = normalizers.BertNormalizer(lowercase=True)
    inner.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    inner.decoder = decoders.WordPiece()
    inner.add_special_tokens(specials)
    inner.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return Tokenizer(inner)


TOKENIZERS = ["char_tok", "bpe_tok", "wordpiece_tok"]


def token_stream(tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, reference word of each token) for DOCUMENTS, each closed by the end-of-text token.

    The reference words come from the text, not from word_start_table: a WordPiece word is one
    of the pre-tokeniser's words; otherwise a word is a run of non-space characters, and a token
    belongs to the run its characters overlap (-1: whitespace or special, no word)."""
    ids: list[int] = []
    words: list[int] = []
    n_words = 0
    for document in DOCUMENTS:
        encoding = tokenizer.inner.encode(document, add_special_tokens=False)
        if tokenizer.kind == "wordpiece":
            local = encoding.word_ids
        else:
            local = _runs_overlapped(tokenizer, encoding.ids)
        words += [n_words + w if w is not None and w >= 0 else -1 for w in local] + [-1]
        ids += [*encoding.ids, tokenizer.eos_id]
        n_words += max(w for w in local if w is not None) + 1
    return torch.tensor(ids), torch.tensor(words)


def _runs_overlapped(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    """For each token, the index of the non-space run its text overlaps (-1 if none)."""
    pieces = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    text = "".join(pieces)
    run_of_char = [-1] * len(text)
    for index, run in enumerate(re.finditer(r"\S+", text)):
        run_of_char[run.start():run.end()] = [index] * (run.end() - run.start())
    out, start = [], 0
    for piece in pieces:
        runs = {r for r in run_of_char[start:start + len(piece)] if r >= 0}
        assert len(runs) <= 1, f"token {piece!r} spans two words"  # no token holds a space inside
        out.append(runs.pop() if runs else -1)
        start += len(piece)
    return out


def random_windows(stream: torch.Tensor, words: torch.Tensor, rows: int, length: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the stream (as the trainer's sampler draws them) and their reference words."""
    starts = torch.randint(0, len(stream) - length, (rows, 1), generator=generator)
    where = starts + torch.arange(length)
    return stream[where], words[where]


def tiny_config(tokenizer: Tokenizer, arch: str = "encoder", **options) -> ModelConfig:
    shape = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 128, **options}
    return ModelConfig(arch=arch, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                       eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.bos_id, mask_token_id=tokenizer.mask_id,
                       **shape)


# --------------------------------------------------------------------------- BERT's recipe


@pytest.mark.parametrize("whole_words", [False, True])
def test_selection_rate_and_80_10_10_split(char_tok, whole_words):
    """Over ~200,000 eligible tokens: the share chosen is mask_prob, and of the chosen 80% become
    the mask, 10% a random non-special token, 10% stay. A random draw equals the original with
    probability 1/|allowed| (the original is one of the allowed ids), which moves that share from
    "random" to "unchanged". With whole words each token is still chosen with probability
    mask_prob, but the tokens of one word together: the variance of the rate is
    p(1-p)·Σ(word length²)/N², not p(1-p)/N. Forced picks (a row left empty) are negligible: a
    256-character row has ~45 words, 0.85**45 ≈ 7e-4."""
    stream, words = token_stream(char_tok)
    objective = Objective("mlm", tiny_config(char_tok, block_size=256), MASK_PROB, char_tok.special_ids,
                          word_start_table(char_tok) if whole_words else None)
    special = torch.tensor(objective.special_ids)
    allowed = char_tok.vocab_size - len(special)
    generator = torch.Generator().manual_seed(0)
    eligible_total = chosen_total = masked = randomised = unchanged = 0
    sum_squared_words = 0.0
    for _ in range(50):
        x, _ = random_windows(stream, words, 16, 257, generator)
        batch = objective.batch(x[:, :-1], x[:, 1:], generator)
        ids, inputs, chosen = x[:, :-1], batch["input_ids"], batch["labels"] != IGNORE_INDEX
        eligible = ~torch.isin(ids, special)
        eligible_total += int(eligible.sum())
        chosen_total += int(chosen.sum())
        masked += int((inputs[chosen] == char_tok.mask_id).sum())
        unchanged += int((inputs[chosen] == ids[chosen]).sum())
        replaced = inputs[chosen & (inputs != ids) & (inputs != char_tok.mask_id)]
        randomised += len(replaced)
        assert not torch.isin(replaced, special).any(), "a random replacement is a special token"
        units = word_index(ids, objective.word_starts, special) if whole_words else torch.arange(256).expand_as(ids)
        lengths = torch.zeros(16, 256).scatter_add_(1, units, eligible.float())
        sum_squared_words += float((lengths**2).sum())
    p = MASK_PROB
    assert within_5_sigma(chosen_total / eligible_total, p, p * (1 - p) * sum_squared_words / eligible_total**2)
    n = chosen_total
    for observed, expected in [(masked, 0.8), (randomised, 0.1 * (1 - 1 / allowed)),
                               (unchanged, 0.1 + 0.1 / allowed)]:
        assert within_5_sigma(observed / n, expected, expected * (1 - expected) / n), (observed / n, expected)


@pytest.mark.parametrize("whole_words", [False, True])
def test_special_and_padding_tokens_are_never_selected(bpe_tok, whole_words):
    """Rows padded on the right (a long pad run), with eos, bos and mask inside the text: none of
    them is ever chosen, labelled or replaced; a row of nothing but specials stays unselected
    (the forced pick only fills rows that have something to choose)."""
    stream, words = token_stream(bpe_tok)
    special = torch.tensor(bpe_tok.special_ids)
    table = word_start_table(bpe_tok) if whole_words else None
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        ids, _ = random_windows(stream, words, 16, 64, generator)
        lengths = torch.randint(8, 65, (16, 1), generator=generator)
        ids = ids.masked_fill(torch.arange(64) >= lengths, bpe_tok.pad_id)
        ids[:, 5] = bpe_tok.mask_id
        ids[0] = bpe_tok.eos_id
        inputs, labels = mask_tokens(ids, bpe_tok.mask_id, bpe_tok.vocab_size, 0.5, generator,
                                     bpe_tok.special_ids, table)
        is_special = torch.isin(ids, special)
        assert not (labels != IGNORE_INDEX)[is_special].any()
        assert torch.equal(inputs[is_special], ids[is_special])
        assert (labels != IGNORE_INDEX)[1:].any(dim=1).all() and (labels[0] == IGNORE_INDEX).all()


def test_loss_covers_only_the_selected_positions(char_tok):
    """The model's loss (with logits, and training's return_logits=False) is the mean
    cross-entropy over the chosen positions alone, against the original tokens, and its gradient
    reaches no other position's logits."""
    torch.manual_seed(0)
    config = tiny_config(char_tok)
    model = LanguageModel(config)
    stream, words = token_stream(char_tok)
    x, _ = random_windows(stream, words, 8, 33, torch.Generator().manual_seed(2))
    objective = Objective("mlm", config, MASK_PROB, char_tok.special_ids)
    batch = objective.batch(x[:, :-1], x[:, 1:], torch.Generator().manual_seed(3))
    chosen = batch["labels"] != IGNORE_INDEX
    assert 0 < chosen.sum() < chosen.numel() // 4
    out = model(**batch)
    out.logits.retain_grad()
    out.loss.backward()
    expected = F.cross_entropy(out.logits.detach()[chosen], x[:, :-1][chosen])
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(model(**batch, return_logits=False).loss.detach(), expected, rtol=1e-5, atol=0)
    assert out.logits.grad[~chosen].abs().max() == 0 and out.logits.grad[chosen].abs().sum(-1).min() > 0


# --------------------------------------------------------------------------- whole words


def test_word_start_table_reads_each_kind_of_token(char_tok, bpe_tok, wordpiece_tok):
    table = word_start_table(char_tok)
    assert table[char_tok.token_to_id(" ")] and table[char_tok.token_to_id("\n")]
    assert not table[char_tok.token_to_id("e")] and not table[char_tok.unk_id]  # <unk>: a character of a word
    table = word_start_table(bpe_tok)
    starts = {tok: bool(table[i]) for tok, i in bpe_tok.inner.get_vocab().items()}
    assert starts["Ġ"] and starts["Ċ"] and starts["ĉ"] and not starts["e"] and not starts["."]
    for token, i in bpe_tok.inner.get_vocab().items():
        if i not in bpe_tok.special_ids:
            assert starts[token] == bpe_tok.decode([i])[:1].isspace(), token
    table = word_start_table(wordpiece_tok, size=wordpiece_tok.vocab_size + 3)
    assert len(table) == wordpiece_tok.vocab_size + 3 and table[-3:].all()
    assert table[wordpiece_tok.token_to_id("the")] and not table[wordpiece_tok.token_to_id("##e")]
    assert table[wordpiece_tok.special_ids].all()


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_whole_word_masking_never_splits_a_word(kind, request):
    """Every word's tokens are chosen together or not at all (its eligible ones: all are, here),
    words as the reference reads them from the text; and whole words of several tokens really
    are chosen. A window's first word may be cut by the window: its tokens inside still agree."""
    tokenizer = request.getfixturevalue(kind)
    stream, words = token_stream(tokenizer)
    table = word_start_table(tokenizer)
    generator = torch.Generator().manual_seed(4)
    multi_token_words_chosen = 0
    for _ in range(20):
        ids, reference = random_windows(stream, words, 16, 128, generator)
        _, labels = mask_tokens(ids, tokenizer.mask_id, tokenizer.vocab_size, MASK_PROB, generator,
                                tokenizer.special_ids, table)
        chosen = labels != IGNORE_INDEX
        key = reference + torch.arange(16)[:, None] * (len(stream) + 1)  # a word in a row
        in_word = reference >= 0
        keys, inverse, counts = torch.unique(key[in_word], return_inverse=True, return_counts=True)
        picked = torch.zeros(len(keys)).scatter_add_(0, inverse, chosen[in_word].float())
        assert ((picked == 0) | (picked == counts)).all(), "a word was split"
        multi_token_words_chosen += int(((picked == counts) & (counts > 1)).sum())
    assert multi_token_words_chosen > 100


def test_word_index_keeps_special_tokens_apart(bpe_tok):
    """"<|endoftext|>The": no space before "The", yet it starts a word; a window opening mid-word
    starts with a word of its own."""
    ids = torch.tensor([bpe_tok.encode("lazy") + [bpe_tok.eos_id] + bpe_tok.encode("The dog")])
    special = torch.tensor(bpe_tok.special_ids)
    index = word_index(ids, word_start_table(bpe_tok), special)[0].tolist()
    n = len(bpe_tok.encode("lazy"))
    assert index[:n] == [0] * n and index[n] == 1 and index[n + 1] == 2 and index[-1] == 3


@pytest.mark.parametrize("kind", ["char_tok", "bpe_tok"])
def test_whole_word_selection_rate_is_mask_prob(kind, request):
    """Each word is chosen with probability mask_prob, so each token is too: the expected share of
    chosen tokens stays mask_prob (the variance, p(1-p)·Σ(word length²)/N², uses the objective's
    own words: it sizes the tolerance, the reference test above checks the words)."""
    tokenizer = request.getfixturevalue(kind)
    stream, words = token_stream(tokenizer)
    table = word_start_table(tokenizer)
    special = torch.tensor(tokenizer.special_ids)
    generator = torch.Generator().manual_seed(5)
    chosen_total = eligible_total = 0
    sum_squared_words = 0.0
    for _ in range(20):
        ids, _ = random_windows(stream, words, 16, 256, generator)
        _, labels = mask_tokens(ids, tokenizer.mask_id, tokenizer.vocab_size, MASK_PROB, generator,
                                tokenizer.special_ids, table)
        eligible = ~torch.isin(ids, special)
        chosen_total += int((labels != IGNORE_INDEX).sum())
        eligible_total += int(eligible.sum())
        lengths = torch.zeros(16, 256).scatter_add_(1, word_index(ids, table, special), eligible.float())
        sum_squared_words += float((lengths**2).sum())
    p = MASK_PROB
    variance = p * (1 - p) * sum_squared_words / eligible_total**2
    assert within_5_sigma(chosen_total / eligible_total, p, variance), (chosen_total / eligible_total, variance)


def test_whole_word_mask_is_an_mlm_option(char_tok):
    with pytest.raises(LmforgeError, match="whole_word_mask applies to masked LM"):
        TrainConfig(whole_word_mask=True)
    with pytest.raises(LmforgeError, match="whole-word masking is for the mlm objective"):
        config = ModelConfig(arch="encoder-decoder", vocab_size=char_tok.vocab_size, mask_token_id=char_tok.mask_id)
        Objective("denoise", config, word_starts=word_start_table(char_tok))
    args = build_parser().parse_args(["pretrain", "--data", "x.txt", "--out", "run", "--whole-word-mask"])
    assert args.whole_word_mask is True
    objective = Objective.for_training(TrainConfig(objective="mlm", whole_word_mask=True), tiny_config(char_tok),
                                       char_tok)
    assert torch.equal(objective.word_starts, word_start_table(char_tok))
    assert Objective.for_training(TrainConfig(objective="mlm"), tiny_config(char_tok), char_tok).word_starts is None


def test_pretrain_with_whole_word_mask_masks_whole_words(tmp_path):
    run = prepare_run(tiny_options(tmp_path, arch="encoder", whole_word_mask=True, max_steps=1))
    assert run.trainer.config.whole_word_mask
    assert run.trainer.objective.word_starts is not None


# --------------------------------------------------------------------------- segments


def test_segment_ids_split_each_window_at_its_first_separator(char_tok):
    """With segment embeddings (BERT's type_vocab_size 2) a window crossing a document's end is
    the pair `A <eos> B`: 0 up to and including the first eos, 1 after; a window without one is
    one segment. Without segment embeddings the batch has no token_type_ids."""
    eos = char_tok.eos_id
    ids = torch.tensor([[5, 6, eos, 7, eos, 8], [5, 6, 7, 8, 9, 10], [eos, 5, 6, 7, 8, 9]])
    assert segment_ids(ids, eos).tolist() == [[0, 0, 0, 1, 1, 1], [0] * 6, [0, 1, 1, 1, 1, 1]]
    paired = Objective("mlm", tiny_config(char_tok, type_vocab_size=2), MASK_PROB, char_tok.special_ids)
    batch = paired.batch(ids[:, :-1], ids[:, 1:], torch.Generator().manual_seed(0))
    assert torch.equal(batch["token_type_ids"], segment_ids(ids[:, :-1], eos))
    assert LanguageModel(paired.config)(**batch).loss.isfinite()
    plain = Objective("mlm", tiny_config(char_tok), MASK_PROB, char_tok.special_ids)
    assert "token_type_ids" not in plain.batch(ids[:, :-1], ids[:, 1:], torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- fill-mask


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory, wordpiece_tok):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.BertConfig(
        vocab_size=wordpiece_tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
        initializer_range=0.3,  # wide enough that the top tokens' probabilities differ clearly
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bert-mlm")
    transformers.BertForMaskedLM(config).eval().save_pretrained(folder)
    wordpiece_tok.save(folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def pipeline(bert_folder):
    transformers = pytest.importorskip("transformers")
    return transformers.pipeline("fill-mask", model=str(bert_folder))


def as_rows(found) -> list[list[tuple[int, str]]]:
    return [[(p.token, p.token_str) for p in mask] for mask in found]


@pytest.mark.parametrize(("text", "top_k"), [
    ("the quick brown [MASK] jumps over the lazy dog.", 5),
    ("the [MASK] brown fox [MASK] over the lazy dog.", 7),
    ("a stitch in [MASK] saves nine.", None),  # every token of the vocabulary, specials included
])
def test_fill_mask_matches_the_transformers_pipeline(bert_folder, pipeline, wordpiece_tok, text, top_k):
    """Same token ids, strings and order, scores to 1e-5. The pipeline returns a flat list for one
    mask and a list per mask for several; fill_mask always gives a list per mask."""
    top_k = top_k or wordpiece_tok.vocab_size
    theirs = pipeline(text, top_k=top_k)
    theirs = [theirs] if isinstance(theirs[0], dict) else theirs
    ours = fill_mask_folder(bert_folder, text, top_k=top_k)
    assert len(ours) == text.count("[MASK]") and all(len(mask) == top_k for mask in ours)
    assert as_rows(ours) == [[(p["token"], p["token_str"]) for p in mask] for mask in theirs]
    torch.testing.assert_close(torch.tensor([[p.score for p in mask] for mask in ours]),
                               torch.tensor([[p["score"] for p in mask] for mask in theirs]), atol=1e-5, rtol=0)
    if top_k == wordpiece_tok.vocab_size:
        assert {p.token for p in ours[0]} >= set(wordpiece_tok.special_ids)


@pytest.fixture(scope="module")
def lmforge_folders(tmp_path_factory, bpe_tok):
    """{arch: folder} for a random encoder and a random decoder with lmforge's BPE tokenizer."""
    folders = {}
    for arch in ("encoder", "decoder"):
        torch.manual_seed(0)
        config = tiny_config(bpe_tok, arch, init_std=0.3)
        folders[arch] = tmp_path_factory.mktemp(arch)
        save_model(LanguageModel(config), folders[arch], bpe_tok)
    return folders


def test_fill_mask_of_an_lmforge_encoder(lmforge_folders, bpe_tok):
    """<mask>, lmforge's spelling; the space before it belongs to the masked token ("Ġfox", as
    MLM masks it), not a token of its own; scores are the softmax of the model's logits at the
    mask, most likely first."""
    text = "the quick brown <mask> jumps"
    ids = encode(bpe_tok, text)
    mask_at = ids.index(bpe_tok.mask_id)
    assert ids == bpe_tok.encode("the quick brown") + [bpe_tok.mask_id] + bpe_tok.encode(" jumps")
    model, tokenizer = load_model(lmforge_folders["encoder"])
    found = fill_mask(model, tokenizer, text, top_k=bpe_tok.vocab_size)[0]
    with torch.no_grad():
        probs = model(torch.tensor([ids])).logits[0, mask_at].softmax(-1)
    assert [p.token for p in found] == probs.argsort(descending=True).tolist()
    torch.testing.assert_close(torch.tensor([p.score for p in found]), probs.sort(descending=True).values)
    assert found[0].token_str == bpe_tok.decode([found[0].token], skip_special_tokens=False)


def test_cli_fill_mask_prints_each_masks_candidates(bert_folder, pipeline, capsys):
    text = "the [MASK] fox [MASK] over the lazy dog."
    assert main(["fill-mask", str(bert_folder), "--text", text, "--top-k", "3", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    theirs = pipeline(text, top_k=3)
    assert printed["text"] == text and [[p["token"] for p in mask] for mask in printed["masks"]] == [
        [p["token"] for p in mask] for mask in theirs]
    assert set(printed["masks"][0][0]) == {"token", "token_str", "score"}
    assert main(["fill-mask", str(bert_folder), "--text", text, "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "mask 1 of 2:" and lines[3] == "mask 2 of 2:" and len(lines) == 6
    score, token = lines[1].split(maxsplit=1)
    assert float(score) == pytest.approx(theirs[0][0]["score"], abs=1e-4) and json.loads(token) == theirs[0][0][
        "token_str"]


def test_cli_fill_mask_refusals_are_one_line_exit_2(bert_folder, lmforge_folders, capsys):
    decoder = lmforge_folders["decoder"]
    cases = [
        ([str(bert_folder), "--text", "no mask here"],
         "no [MASK] in the text: write [MASK] where a token should be predicted"),
        ([str(lmforge_folders["encoder"]), "--text", "the [MASK] fox"],
         "no <mask> in the text: write <mask> where a token should be predicted"),
        ([str(bert_folder), "--text", "the [MASK] fox", "--top-k", "0"], "top_k must be at least 1; got 0"),
        ([str(bert_folder), "--text", "the [MASK] fox " * 25], "the text is 77 tokens; the model reads at most 64"),
        ([str(decoder), "--text", "the <mask> fox"],
         f"{decoder} is a decoder model; fill-mask needs an encoder trained with masked LM "
         "(lmforge pretrain --arch encoder, or a BertForMaskedLM folder)"),
    ]
    for argv, message in cases:
        assert main(["fill-mask", *argv]) == 2
        assert one_line_error(capsys.readouterr().err) == f"lmforge fill-mask: error: {message}"
