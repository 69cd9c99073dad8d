"""Benchmarks of mono-quant against float baselines and other PyTorch quantizers.

``python -m benchmarks.run`` (or ``make bench``) measures latency, stored weight bytes and output
error, and writes ``docs/benchmarks.md``. Every quantized model is built through the public
``mono_quant`` API, so the numbers reflect whatever kernels the installed package has.
"""
