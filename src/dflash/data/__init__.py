"""Data: benchmark prompt loaders, the synthetic corpus, chat formatting, token files, published references."""
