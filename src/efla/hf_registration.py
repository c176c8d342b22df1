"""Registers model_type "efla" with transformers' Auto classes without importing transformers in ``import efla``.

``import efla`` stays fast because transformers is not imported; yet ``AutoModelForCausalLM.from_pretrained`` must
know EFLA checkpoints as soon as a program that imported efla uses transformers' Auto classes. So:

- if transformers' Auto machinery is already loaded, ``efla.models`` (which registers) is imported at once;
- otherwise an import hook watches transformers' own modules and imports ``efla.models`` when the outermost
  transformers import that loaded the Auto machinery (``transformers.models.auto.configuration_auto``) has finished,
  then removes itself. Waiting for the outermost import to finish matters: transformers' modules import the Auto
  classes part-way through their own import (``modeling_layers`` does), and importing efla's model there would
  import a half-initialised transformers module.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Sequence

TRIGGER = "transformers.models.auto.configuration_auto"


def register_models() -> None:
    """Import ``efla.models``, whose import registers EFLAConfig / EFLAModel / EFLAForCausalLM with the Auto classes."""
    import efla.models  # noqa: F401


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of every transformers module so that, once no transformers module is executing any more and
    the Auto machinery is loaded, the EFLA classes are registered."""

    def __init__(self) -> None:
        self.executing = 0  # transformers modules whose code is running (nested imports)

    def find_spec(self, name: str, path: Sequence[str] | None, target: types.ModuleType | None = None,
                  ) -> importlib.machinery.ModuleSpec | None:
        if name != "transformers" and not name.startswith("transformers."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _CountingLoader(spec.loader, self)
                return spec
        return None

    def module_finished(self) -> None:
        """Called after each transformers module's code ran (or failed)."""
        if self.executing == 0 and TRIGGER in sys.modules and self in sys.meta_path:
            sys.meta_path.remove(self)
            register_models()


class _CountingLoader(importlib.abc.Loader):
    """Delegates to the real loader; tells the finder when the module's code has run."""

    def __init__(self, loader: importlib.abc.Loader, finder: _AfterTransformersImport) -> None:
        self.loader, self.finder = loader, finder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self.finder.executing += 1
        try:
            self.loader.exec_module(module)
        finally:
            self.finder.executing -= 1
        self.finder.module_finished()

    def __getattr__(self, name: str) -> object:  # get_source, get_filename, ...: what inspect and tracebacks ask
        if name == "loader":  # not set yet (a copy under construction): no delegation loop
            raise AttributeError(name)
        return getattr(self.loader, name)


def install() -> None:
    """Register now if transformers' Auto machinery is loaded, else once it is (see the module docstring)."""
    if TRIGGER in sys.modules:
        register_models()
    elif not any(isinstance(finder, _AfterTransformersImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformersImport())
