"""Data pipeline: download Project Gutenberg books, prepare token shards, load batches."""
