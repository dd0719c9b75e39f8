"""Pipeline-parallel Cosmos-Transfer inference on diffusers model classes."""

from transfer.errors import TransferError

__all__ = ["TransferError"]
__version__ = "0.1.0"
