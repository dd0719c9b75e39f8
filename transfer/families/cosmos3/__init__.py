"""Cosmos 3 transfer (hints as tokens): diffusers' Cosmos3OmniModularPipeline, run stage by stage, on one process or across ranks."""
