"""Task data: the built-in tasks, user files, partitioning over clients and one-time tokenization."""

from fedpeft.data.instructions import RawInstructions, load_instructions
from fedpeft.data.prepared import PreparedTask, open_prepared, prepare
from fedpeft.data.sources import DataError, RawTask, load_raw

__all__ = ["DataError", "PreparedTask", "RawInstructions", "RawTask", "load_instructions", "load_raw",
           "open_prepared", "prepare"]
