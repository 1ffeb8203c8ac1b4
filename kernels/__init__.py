"""Triton kernels of fastgen (installed as fastgen.kernels). Only @triton.jit code lives here; the
host launchers sit in the op files under fastgen/ops/."""

if __name__ != "fastgen.kernels":
    # Imported as a top-level `kernels` (the checkout root on sys.path: running from the checkout,
    # pytest's rootdir), this folder would shadow Hugging Face's `kernels` package, which diffusers
    # and transformers import. Hand the name over to the next `kernels` on sys.path, or say there is none.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _root])
    if _spec is None:
        del sys.modules[__name__]
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_module)
