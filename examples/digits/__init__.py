"""Train a small CNN on scikit-learn's 8x8 digits and quantize it with QuantizeCallback.

Run ``python -m examples.digits.train`` from the repository root.
"""
