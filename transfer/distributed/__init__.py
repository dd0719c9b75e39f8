"""The pipeline-parallel runtime: placement (who runs what), transport (how tensors move), stages."""
