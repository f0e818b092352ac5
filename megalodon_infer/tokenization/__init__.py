"""Text <-> token ids: the SentencePiece tokenizer, chat templates, incremental detokenization and
stop strings. Knows nothing of tensors, sampling or HTTP.
"""
