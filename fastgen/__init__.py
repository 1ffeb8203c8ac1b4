"""fastgen: fused PyTorch kernels for image generators.

Importing fastgen registers every op under torch.ops.fastgen (C++ schemas from fastgen._C, custom
ops from fastgen.ops). `fastgen.backends()` says which implementations this install can run.
"""

from fastgen.dispatch import backends, summary, use_backend
from fastgen import activations, ops, nn  # noqa: E402  (registers the custom ops)
from fastgen.conversion import convert, unconvert  # noqa: E402

__version__ = "0.1.0"
__all__ = ["backends", "use_backend", "activations", "ops", "nn", "convert", "unconvert", "__version__"]

# Said once, at import: which backends this install has.
from fastgen.dispatch import log as _log  # noqa: E402

_log.info(summary())
