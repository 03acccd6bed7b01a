"""Import ``timm`` even where ``torchvision`` cannot be imported.

timm imports torchvision at import time (its data pipeline, and ``FrozenBatchNorm2d`` in its layer
registry), but the models used here (``vit_small_patch16_224``, ``resnet18d``) need none of it. Where
torchvision is missing or broken — for example a CPU-only torch next to PyPI's CUDA torchvision wheel,
whose C extension cannot load — :func:`import_timm` imports timm once more with placeholder
``torchvision`` modules visible *only during that import* (removed from ``sys.modules`` afterwards,
so a later ``import torchvision`` behaves as before). The placeholders raise if anything calls them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

from cortexflow.errors import BackendUnavailableError

TIMM_HINT = ('pip install timm  (with a torch whose torchvision works), or: pip install --no-deps timm '
             'pyyaml huggingface_hub safetensors pillow  (CortexFlow then imports timm without torchvision)')


class _Placeholder(type):
    """A class whose attributes are more placeholders and which cannot be instantiated."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"torchvision is not importable here; {cls.__name__} is a placeholder (see cortexflow.encoders.timm_compat)")


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _Placeholder(name, (), {})
        setattr(self, name, value)
        return value


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _PlaceholderModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        return None


def _forget(prefixes: tuple[str, ...]) -> None:
    for name in [n for n in sys.modules if n.split(".")[0] in prefixes]:
        del sys.modules[name]


def import_timm():
    """The ``timm`` module (see module doc); ``BackendUnavailableError`` when timm is not installed."""
    if "timm" in sys.modules and hasattr(sys.modules["timm"], "create_model"):
        return sys.modules["timm"]
    try:
        return importlib.import_module("timm")
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] == "timm":
            raise BackendUnavailableError(f"the timm encoders need the 'timm' package; {TIMM_HINT}") from err
        first_error = err
    except Exception as err:  # noqa: BLE001 - a broken torchvision raises RuntimeError/OSError on import
        first_error = err
    _forget(("timm", "torchvision"))
    finder = _PlaceholderFinder()
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module("timm")
    except Exception as err:  # noqa: BLE001
        _forget(("timm",))
        raise BackendUnavailableError(
            f"timm is installed but cannot be imported ({type(first_error).__name__}: {first_error}; "
            f"without torchvision: {type(err).__name__}: {err}); {TIMM_HINT}"
        ) from err
    finally:
        sys.meta_path.remove(finder)
        _forget(("torchvision",))


def timm_available() -> bool:
    """Whether :func:`import_timm` succeeds."""
    try:
        import_timm()
        return True
    except BackendUnavailableError:
        return False
