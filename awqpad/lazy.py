"""Import heavy dependencies on first use, so `awqpad --help` / `inspect` do not pay for them.

`from awqpad.lazy import numpy as np` gives a stand-in module: the first attribute read imports numpy and
copies its namespace in, so later reads are plain attribute lookups. numpy costs ~0.13 s to import, more
than the rest of `awqpad inspect`; only padding and verifying need it.
"""

from __future__ import annotations

import importlib
import types


class LazyModule(types.ModuleType):
    def __init__(self, name: str):
        super().__init__(name)
        self.__dict__["_lazy_target"] = name

    def __getattr__(self, attr: str):
        module = importlib.import_module(self.__dict__["_lazy_target"])
        self.__dict__.update(module.__dict__)
        return getattr(module, attr)


numpy = LazyModule("numpy")


class CallablePackage(types.ModuleType):
    """A stage package that is also an API function: `awqpad.plan` is both the plan/ package and
    `awqpad.api.plan` (Python binds a submodule to its parent's attribute, so a plain function of that
    name in awqpad/__init__.py would be replaced as soon as the package is imported)."""

    def __call__(self, *args, **kwargs):
        api = importlib.import_module("awqpad.api")
        return getattr(api, self.__name__.rsplit(".", 1)[-1])(*args, **kwargs)


def make_callable(module_name: str) -> None:
    import sys

    sys.modules[module_name].__class__ = CallablePackage
