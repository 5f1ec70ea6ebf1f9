"""Translation and summarisation: parallel data (data.py), training (train.py), decoding (decode.py)."""
