"""argparse types that refuse bad numbers at parse time, before any model loads: the error is one
line naming the flag (`llmos serve: error: argument --port: must be an integer in 1..65535, got 99999`)."""

from __future__ import annotations

import argparse
from typing import Callable

# The chat models' weight forms (llmos.api.DTYPES without the aliases); "gguf" is a GGUF file's own
# quantized blocks. Named here so the CLI does not import torch to build its parser.
DTYPES = ["auto", "fp32", "bf16", "int8", "int4", "gguf"]


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An int type accepting low <= value (<= high)."""
    wanted = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
        return value

    return parse
