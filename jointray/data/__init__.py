"""Data layer: sources, validation, preprocessing, Parquet shards and streaming."""
