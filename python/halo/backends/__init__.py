"""Per-device kernels of halo's torch operators (``torch.ops.halo.*``).

The operators are defined once, with their schema, argument checks, fake kernels and
autograd formulas, in :mod:`halo.ops`; ``backends/cpu/ops.py`` and ``backends/cuda/ops.py``
register each operator's kernel for their device with ``torch.library.register_kernel``.
Importing :mod:`halo.ops` imports both.
"""

import sys
import types

from ..backend import backends as _list_backends


class _CallablePackage(types.ModuleType):
    """Importing ``halo.backends.cpu`` binds ``halo.backends`` to this package, which would hide
    the public function ``halo.backends()`` (the kernel backends this build and CPU run); the
    package therefore answers a call as that function does."""

    def __call__(self, *args, **kwargs):
        return _list_backends(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
