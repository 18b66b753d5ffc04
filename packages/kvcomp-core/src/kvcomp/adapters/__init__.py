"""Model-family adapters and their registry.

    kvcomp.adapters.available()            {model_type: Adapter}, entry points + register()
    kvcomp.adapters.get_adapter(mt)        the adapter, or UnsupportedModelError
    kvcomp.adapters.register(mt, adapter)  for adapters not installed as a distribution
    kvcomp.adapters.info()                 rows (model_type, adapter, package, version)

Family packages declare their adapters in the entry-point group ``kvcomp.adapters``.
"""

from kvcomp.adapters.base import Adapter
from kvcomp.adapters.registry import (
    ENTRY_POINT_GROUP,
    UnsupportedModelError,
    available,
    failures,
    get_adapter,
    info,
    register,
    reload,
    unregister,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Adapter",
    "UnsupportedModelError",
    "available",
    "failures",
    "get_adapter",
    "info",
    "register",
    "reload",
    "unregister",
]
