"""The flce benchmark: `python -m flce.bench --help`.

Implements the project's benchmark method (BENCHMARKS.md): per shape and method, fwd and fwd+bwd
time, ratios to the three-GEMM floor and to torch.compile, peak extra memory and accuracy against
a float64 reference; forward-only figures; memory and time as the token count grows. Results go
to bench/results/<gpu>.md and .json with PNG plots.
"""

from .cli import main
from .data import KINDS, SHAPES, Shape, make_inputs
from .reference import reference

__all__ = ["KINDS", "SHAPES", "Shape", "main", "make_inputs", "reference"]
