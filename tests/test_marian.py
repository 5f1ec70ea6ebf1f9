"""MarianMT interop: random MarianMTModel folders (shared and separate vocabularies, swish, scaled
embeddings, sinusoidal halves) convert with equal logits (1e-4, fp32), identical greedy and beam
output, export back into folders transformers loads; their SentencePiece tokenizers, trained here
on a few lines, encode and decode as transformers' MarianTokenizer does."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import one_thread  # noqa: F401  (autouse: tiny matrices run best on one thread)
from test_beam import assert_same_as_transformers

from lmforge.errors import LmforgeError
from lmforge.interop import from_hf, to_hf
from lmforge.model.position import sinusoidal_table
from lmforge.spm import SentencePieceTokenizer

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")
transformers.logging.set_verbosity_error()

ATOL = 1e-4
SOURCE = ["the cat sits on the mat", "a dog runs in the park", "two men play football", "the sun is shining",
          "a woman reads a book", "children play in the water", "the man wears a red hat"] * 6
TARGET = ["die katze sitzt auf der matte", "ein hund rennt im park", "zwei männer spielen fußball",
          "die sonne scheint", "eine frau liest ein buch", "kinder spielen im wasser",
          "der mann trägt einen roten hut"] * 6
EOS, UNK = 0, 1  # Marian's vocab.json: </s> first, <unk> second, <pad> last


def _train_spm(lines: list[str], prefix, size: int) -> list[str]:
    text = prefix.with_suffix(".txt")
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(prefix), vocab_size=size, model_type="unigram",
                                   character_coverage=1.0, bos_id=-1, eos_id=-1, unk_id=0, minloglevel=2)
    processor = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    return [processor.id_to_piece(i) for i in range(1, processor.get_piece_size())]


def _vocab(pieces: list[str]) -> dict[str, int]:
    words = ["</s>", "<unk>", *dict.fromkeys(pieces), "<pad>"]
    return {w: i for i, w in enumerate(words)}


def _marian(folder, separate: bool):
    """(transformers model, folder)."""
    work = folder / "spm"
    work.mkdir()
    source_pieces, target_pieces = _train_spm(SOURCE, work / "source", 40), _train_spm(TARGET, work / "target", 34)
    for side in ("source", "target"):
        (folder / f"{side}.spm").write_bytes((work / f"{side}.model").read_bytes())
    if separate:
        vocab, target_vocab = _vocab(source_pieces), _vocab(target_pieces)
        (folder / "target_vocab.json").write_text(json.dumps(target_vocab))
    else:
        vocab = target_vocab = _vocab(source_pieces + target_pieces)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tokenizer_config.json").write_text(json.dumps({"separate_vocabs": separate, "source_lang": "en",
                                                              "target_lang": "de"}))
    pad = target_vocab["<pad>"]
    config = transformers.MarianConfig(
        vocab_size=len(vocab), decoder_vocab_size=len(target_vocab), share_encoder_decoder_embeddings=not separate,
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, activation_function="swish",
        scale_embedding=True, pad_token_id=pad, eos_token_id=EOS, decoder_start_token_id=pad, forced_eos_token_id=None,
        init_std=0.3,
    )
    torch.manual_seed(0)
    model = transformers.MarianMTModel(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():  # random biases and gains: a forgotten copy shows
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "norm" in name:
                p.copy_(1 + torch.randn(p.shape, generator=gen) * 0.1)
        model.final_logits_bias.copy_(torch.randn(model.final_logits_bias.shape, generator=gen) * 0.5)
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module", params=["shared", "separate"])
def marian(request, tmp_path_factory):
    return _marian(tmp_path_factory.mktemp(f"marian-{request.param}"), request.param == "separate")


def _batch(tokenizer, texts):
    rows = tokenizer.encode_batch(texts)
    width = max(map(len, rows))
    pad = tokenizer.pad_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    return rows, ids, (ids != pad).long()


def test_marian_positions_are_sines_then_cosines():
    table = sinusoidal_table(10, 8, halves=True)
    interleaved = sinusoidal_table(10, 8)
    torch.testing.assert_close(table[:, :4], interleaved[:, 0::2], atol=0, rtol=0)
    torch.testing.assert_close(table[:, 4:], interleaved[:, 1::2], atol=0, rtol=0)


def test_marian_logits_match_with_padded_source(marian):
    hf, folder = marian
    model, tokenizer = from_hf(folder)
    separate = hf.config.share_encoder_decoder_embeddings is False
    assert model.config.sinusoidal_halves and model.config.activation == "silu" and not model.config.embedding_norm
    assert (model.config.decoder_vocab_size is not None) == separate
    if separate:  # two tables of their own sizes; the head predicts the target's
        assert (model.config.vocab_size, model.config.decoder_vocab_size) == (42, 36)
    _, src, mask = _batch(tokenizer, ["the cat sits in the park", "a dog", "two women read a red book"])
    target = torch.randint(2, hf.config.decoder_vocab_size - 1, (3, 8), generator=torch.Generator().manual_seed(2))
    target[:, 0] = hf.config.decoder_start_token_id
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=mask, decoder_input_ids=target).logits
        ours = model(src, attention_mask=mask, decoder_input_ids=target).logits
    assert ref.shape[-1] == hf.config.decoder_vocab_size and ref.abs().max() > 0.5
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("settings", [
    dict(num_beams=1, max_length=16),
    dict(num_beams=4, length_penalty=0.7, no_repeat_ngram_size=2, num_return_sequences=2, max_length=16),
])
def test_marian_greedy_and_beam_output_match_transformers(marian, settings):
    hf, folder = marian
    model, tokenizer = from_hf(folder)
    rows, _, _ = _batch(tokenizer, ["the cat sits in the park", "a dog", "two women read a red book"])
    if settings["num_beams"] == 1:
        settings = {**settings, "early_stopping": True}  # greedy, as beam search of one
    ours = assert_same_as_transformers(hf, model, rows, EOS, tokenizer.pad_id, **settings)
    assert len({tuple(h[0].tokens) for h in ours}) > 1


def test_sentencepiece_tokenizer_matches_transformers(marian):
    hf, folder = marian
    ours = SentencePieceTokenizer.load(folder)
    theirs = transformers.MarianTokenizer.from_pretrained(folder)
    texts = ["the cat sits on the mat", "a dog plays football in the park!", "zebra xylophone"]
    assert ours.encode_batch(texts) == theirs(texts).input_ids
    assert ours.unk_id == UNK and UNK in ours.encode("zebra xylophone")  # pieces vocab.json lacks are <unk>
    targets = ["die katze spielt im wasser", "ein mann liest"]
    ids = theirs(text_target=targets).input_ids
    assert [ours.encode_target(t) for t in targets] == ids
    assert [ours.decode(i) for i in ids] == theirs.batch_decode(ids, skip_special_tokens=True)


def test_marian_export_loads_in_transformers_and_matches(marian, tmp_path):
    hf, folder = marian
    model, tokenizer = from_hf(folder)
    to_hf(model, tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "marian" and config["architectures"] == ["MarianMTModel"]
    back = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert type(back).__name__ == "MarianMTModel"
    rows, src, mask = _batch(tokenizer, ["the sun is shining", "a man"])
    target = torch.tensor([[hf.config.decoder_start_token_id, 5, 9, 7]] * 2)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=src, attention_mask=mask, decoder_input_ids=target).logits,
                                   hf(input_ids=src, attention_mask=mask, decoder_input_ids=target).logits,
                                   atol=ATOL, rtol=0)
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(["the sun is shining", "a man"]).input_ids == rows
    again, _ = from_hf(tmp_path)  # and back in: the same model
    with torch.no_grad():
        torch.testing.assert_close(again(src, attention_mask=mask, decoder_input_ids=target).logits,
                                   model(src, attention_mask=mask, decoder_input_ids=target).logits, atol=0, rtol=0)


def test_untied_marian_head_is_refused_by_name(marian, tmp_path):
    _, folder = marian
    for name in ("model.safetensors", "source.spm", "target.spm", "vocab.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    if (folder / "target_vocab.json").is_file():
        (tmp_path / "target_vocab.json").write_bytes((folder / "target_vocab.json").read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(LmforgeError, match="marian config: tie_word_embeddings=False is not supported"):
        from_hf(tmp_path)


def test_marian_converts_to_an_lmforge_folder_that_translates_alike(marian, tmp_path):
    """convert --from-hf keeps the SentencePiece files beside the weights; the folder loads back
    with the same tokenizer and decodes the same beams."""
    from lmforge.beam import BeamConfig, beam_search_texts
    from lmforge.model_folder import convert_from_hf, load_model

    _, folder = marian
    convert_from_hf(folder, tmp_path / "lmf")
    model, tokenizer = from_hf(folder)
    again, tokenizer_again = load_model(tmp_path / "lmf")
    assert isinstance(tokenizer_again, SentencePieceTokenizer)
    texts = ["the cat sits in the park", "a dog"]
    assert tokenizer_again.encode_batch(texts) == tokenizer.encode_batch(texts)
    config = BeamConfig(num_beams=3, num_return_sequences=2, max_length=12, suppress_tokens=(tokenizer.pad_id,))
    found = beam_search_texts(again, tokenizer_again, texts, config)
    assert found == beam_search_texts(model, tokenizer, texts, config)


def test_marian_greedy_with_repetition_penalty_matches_transformers(marian):
    """lmforge generate's penalty remembers tokens over the decoder's own vocabulary."""
    from lmforge.generate import GenerationConfig, decode_steps

    hf, folder = marian
    model, tokenizer = from_hf(folder)
    rows, src, mask = _batch(tokenizer, ["the cat sits in the park"])
    ref = hf.generate(src, attention_mask=mask, do_sample=False, repetition_penalty=1.5, max_new_tokens=10)
    config = GenerationConfig(temperature=0, max_new_tokens=10, repetition_penalty=1.5)
    ours = [tokens[0] for tokens, _ in decode_steps(model, rows, config, eos_id=EOS, pad_id=tokenizer.pad_id)]
    assert ours == ref[0, 1 : 1 + len(ours)].tolist()
