"""fastarch's Triton kernels, one module per op family; installed as ``fastarch.kernels``.

Python started from the checkout's root (``python -m pytest``, ``python -m fastarch``) puts the
root first on ``sys.path``, where this directory would be imported as the top-level ``kernels``
and hide Hugging Face's ``kernels`` package, which transformers imports. Imported under that name,
it hands the name to the next ``kernels`` on the path, or to none.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    # every fastarch checkout's root is passed over, not only this one's (two checkouts on the
    # path, as when comparing trees, would otherwise hand the name back and forth for ever)
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if not os.path.isfile(os.path.join(p or os.curdir, "fastarch", "__init__.py"))]
    )
    if _spec is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # what `import kernels` returns
    _spec.loader.exec_module(_module)
