"""Marian's SentencePiece tokenizers: `source.spm` and `target.spm`, with ids from `vocab.json`.

A Marian folder (Opus-MT) does not use SentencePiece's own ids: each side's model splits text
into pieces, and `vocab.json` (shared, or `target_vocab.json` as well when the two sides have
vocabularies of their own) numbers them; a piece it lacks is `<unk>`, and every encoded text
ends with `</s>`. That is what transformers' MarianTokenizer does, and what this class does
through the `sentencepiece` package. It answers the same questions as lmforge's Tokenizer
(encode, decode, the special ids), so beam search, translation and export take either.
`encode` is the source side, `decode` the target side (what a translator needs);
`encode_target` reads references.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_copy, atomic_write_text
from lmforge.errors import LmforgeError

FILES = ("source.spm", "target.spm", "vocab.json")
SPECIALS = {"eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
SPIECE_SPACE = "\u2581"


MARKER = "lmforge_sentencepiece"  # the key of the tokenizer.json that stands for these files in a model folder


def is_marker(path: Path) -> bool:
    """Whether a tokenizer.json is the stand-in `save` writes (small: only its start is read)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(64).lstrip().startswith(f'{{"{MARKER}"')
    except (OSError, UnicodeDecodeError):
        return False  # Tokenizer.load reports the file


class SentencePieceTokenizer:
    kind = "sentencepiece"

    def __init__(self, folder: str | Path):
        try:
            import sentencepiece
        except ImportError:
            raise LmforgeError("Marian tokenizers need the sentencepiece package: pip install sentencepiece") from None
        self.folder = Path(folder)
        missing = [name for name in FILES if not (self.folder / name).is_file()]
        if missing:
            raise LmforgeError(f"{self.folder}: a SentencePiece (Marian) tokenizer needs {', '.join(missing)}")
        self.options = _read_json(self.folder / "tokenizer_config.json", {}) if (
            self.folder / "tokenizer_config.json").is_file() else {}
        self.separate = bool(self.options.get("separate_vocabs"))
        self.source_vocab = _read_json(self.folder / "vocab.json")
        target_file = self.folder / "target_vocab.json"
        if self.separate and not target_file.is_file():
            raise LmforgeError(f"{self.folder}: separate_vocabs is set but target_vocab.json is missing")
        self.target_vocab = _read_json(target_file) if self.separate else self.source_vocab
        self.target_pieces = {i: piece for piece, i in self.target_vocab.items()}
        self.spm = {}
        for side in ("source", "target"):
            processor = sentencepiece.SentencePieceProcessor()
            try:
                processor.Load(str(self.folder / f"{side}.spm"))
            except (OSError, RuntimeError) as exc:
                raise LmforgeError(f"cannot read {self.folder / f'{side}.spm'}: {exc}") from None
            self.spm[side] = processor
        if SPECIALS["unk"] not in self.source_vocab:
            raise LmforgeError(f"{self.folder / 'vocab.json'} has no <unk> token")

    @classmethod
    def load(cls, folder: str | Path) -> SentencePieceTokenizer:
        return cls(folder)

    # ------------------------------------------------------------------ ids of the special tokens

    def _role(self, role: str, vocab: dict | None = None) -> int | None:
        return (vocab or self.target_vocab).get(SPECIALS.get(role, ""))

    @property
    def eos_id(self) -> int | None:
        return self._role("eos")

    @property
    def pad_id(self) -> int | None:
        return self._role("pad")

    @property
    def unk_id(self) -> int | None:
        return self._role("unk")

    bos_id = mask_id = None  # Marian starts decoding from its pad token and masks nothing

    @property
    def vocab_size(self) -> int:
        """The source side's: the encoder's token table (the decoder's may differ: decoder_vocab_size)."""
        return len(self.source_vocab)

    @property
    def special_ids(self) -> list[int]:
        return sorted({i for role in SPECIALS for i in (self._role(role),) if i is not None})

    def token_to_id(self, token: str) -> int | None:
        return self.source_vocab.get(token)

    def id_to_token(self, i: int) -> str | None:
        return self.target_pieces.get(i)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.folder)!r}, vocab_size={self.vocab_size}, separate={self.separate})"

    # ------------------------------------------------------------------ text <-> ids

    def _encode(self, text: str, side: str, vocab: dict) -> list[int]:
        code = []
        if text.startswith(">>") and (end := text.find("<<")) != -1:  # a target-language code such as >>fr<<
            code, text = [text[: end + 2]], text[end + 2 :]
        unk = vocab[SPECIALS["unk"]]
        pieces = code + self.spm[side].encode(text, out_type=str)
        return [vocab.get(piece, unk) for piece in pieces] + [vocab[SPECIALS["eos"]]]

    def encode(self, text: str) -> list[int]:
        """Source text → ids, ending with </s>."""
        return self._encode(text, "source", self.source_vocab)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def encode_target(self, text: str) -> list[int]:
        return self._encode(text, "target", self.target_vocab)

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        """Target ids → text, through target.spm."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        specials = set(self.special_ids)
        out, pieces = [], []
        for i in ids:
            if i in specials:
                if not skip_special_tokens:
                    out += [self.spm["target"].decode_pieces(pieces), self.target_pieces.get(i, "")]
                    pieces = []
                continue
            pieces.append(self.target_pieces.get(i, SPECIALS["unk"]))
        out.append(self.spm["target"].decode_pieces(pieces))
        return " ".join(part for part in out if part).replace(SPIECE_SPACE, " ").strip()

    # ------------------------------------------------------------------ files

    def save(self, path: str | Path) -> None:
        """Copy the files into the folder of `path`, and write at `path` (where another tokenizer
        writes its tokenizer.json) a stand-in that `Tokenizer.load` follows back to them."""
        names = self.save_hf(Path(path).parent)
        atomic_write_text(Path(path), json.dumps({MARKER: names}) + "\n")

    def save_hf(self, folder: str | Path) -> list[str]:
        """The files transformers' MarianTokenizer reads, in `folder` (no tokenizer.json: transformers
        would take it for a fast tokenizer's)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = [*FILES, *(["target_vocab.json"] if self.separate else [])]
        for name in names:
            if (folder / name).resolve() != (self.folder / name).resolve():
                atomic_copy(self.folder / name, folder / name)
        atomic_write_text(folder / "tokenizer_config.json", json.dumps(self.hf_tokenizer_config(), indent=2) + "\n")
        self.folder = folder
        return names

    def hf_tokenizer_config(self) -> dict:
        return {**self.options, "tokenizer_class": "MarianTokenizer", "separate_vocabs": self.separate,
                **{f"{role}_token": token for role, token in SPECIALS.items()}}


def _read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        if default is not None:
            return default
        raise LmforgeError(f"cannot read {path}: {exc}") from None

