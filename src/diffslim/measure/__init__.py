"""Measurements of a denoiser or pipeline: MACs (``macs``), and later latency, memory and quality."""
