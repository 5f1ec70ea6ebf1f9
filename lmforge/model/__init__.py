"""The model family: one configurable Transformer (see transformer.py, read top to bottom)."""

from lmforge.model.cache import KVCache
from lmforge.model.classifier import SequenceClassifier, SpanExtractor, build_model
from lmforge.model.transformer import LanguageModel, ModelOutput

__all__ = ["KVCache", "LanguageModel", "ModelOutput", "SequenceClassifier", "SpanExtractor", "build_model"]
