"""Runnable demos of mono_quant on small real data sets."""
