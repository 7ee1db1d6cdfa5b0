"""Measurements of a denoiser or pipeline: its profile (params, MACs, latency, memory; ``profile``) and quality
(``quality``). The MAC counter itself is ``diffslim.models.macs``, below the anatomy that counts with it."""
