"""hyfhe: hybrid neural networks whose private modules run on encrypted activations (TFHE).

``hyfhe.torch.HybridFHEModel`` is the PyTorch front (Concrete ML's flow); ``hyfhe._native`` is
the Rust core it calls. Errors from the core are :class:`HyfheError`, a server's refusals
:class:`ServerError` (``args``: message, HTTP status, error code) and an unreachable server
:class:`ServerUnreachable`.
"""

from ._native import HyfheError, ServerError, ServerUnreachable, __version__

__all__ = ["HyfheError", "ServerError", "ServerUnreachable", "__version__"]
