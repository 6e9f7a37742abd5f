"""Inference: a checkpoint applied to raw cases, one request at a time or in batch on Ray Data."""
