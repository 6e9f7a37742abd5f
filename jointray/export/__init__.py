"""Deployable models: a checkpoint exported to ONNX or TorchScript, optionally pruned and quantised to INT8,
served by the same inference core (:mod:`jointray.export.runtime`).

- :mod:`jointray.export.graph`: the model as a graph on plain tensors, and its Monte Carlo twin.
- :mod:`jointray.export.exporter`: ``jointray export`` — writes, checks against PyTorch, records.
- :mod:`jointray.export.quantize`: static INT8 on onnxruntime, verified to run as INT8.
- :mod:`jointray.export.prune`: magnitude pruning with a short fine-tune.
- :mod:`jointray.export.runtime`: an exported graph behind the model interface the inference core calls.

Nothing is imported here: inference loads ``runtime`` alone, without the exporter's training-side imports.
"""
