"""Compatibility shims that let auto_LiRPA 0.3 (written for torch < 1.13 and numpy 1) run on torch 2.x / numpy 2.

PyPI only carries auto_LiRPA 0.3, installed with ``--no-deps``. Every shim lives here, is applied once, and
records whether it was needed, so a test fails loudly when one stops being needed (time to delete it) or stops
working. Import ``certprune.lirpa`` rather than this module; it is the only place that touches auto_LiRPA.
"""
import importlib
import sys

import torch

APPLIED: dict[str, bool] = {}


def _alias_numpy_arraysetops() -> bool:
    """numpy 2 moved ``numpy.lib.arraysetops`` to ``numpy.lib._arraysetops_impl``; auto_LiRPA imports the old name."""
    try:
        importlib.import_module("numpy.lib.arraysetops")
        return False
    except ImportError:
        sys.modules["numpy.lib.arraysetops"] = importlib.import_module("numpy.lib._arraysetops_impl")
        return True


def _restore_set_opset_version() -> bool:
    """torch 2 dropped ``symbolic_helper._set_opset_version``, which auto_LiRPA calls before optimising its trace."""
    # torch.onnx's attribute ``symbolic_helper`` and the module ``torch.onnx.symbolic_helper`` that
    # auto_LiRPA imports from are different objects on torch 2.x; patch the one ``sys.modules`` holds.
    symbolic_helper = importlib.import_module("torch.onnx.symbolic_helper")
    if hasattr(symbolic_helper, "_set_opset_version"):
        return False
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

    def _set_opset_version(opset_version: int) -> None:
        GLOBALS.export_onnx_opset_version = opset_version

    symbolic_helper._set_opset_version = _set_opset_version
    return True


def _node_getitem() -> bool:
    """torch 2 removed ``Node.__getitem__`` (attribute access by name), which auto_LiRPA's graph parser uses."""
    if hasattr(torch._C.Node, "__getitem__"):
        return False
    symbolic_helper = importlib.import_module("torch.onnx.symbolic_helper")
    torch._C.Node.__getitem__ = lambda node, key: symbolic_helper._node_get(node, key)
    return True


def _named_members_remove_duplicate() -> bool:
    """torch 2 passes ``remove_duplicate`` to ``Module._named_members``; auto_LiRPA's override lacks the argument."""
    from auto_LiRPA.bound_general import BoundedModule

    original = BoundedModule._named_members
    if "remove_duplicate" in original.__code__.co_varnames:
        return False

    def _named_members(self, get_members_fn, prefix="", recurse=True, remove_duplicate=True):
        return original(self, get_members_fn, prefix, recurse)

    BoundedModule._named_members = _named_members
    return True


def apply() -> None:
    """Apply every shim once; the order matters (auto_LiRPA can only be imported after the first three)."""
    if APPLIED:
        return
    APPLIED["numpy.lib.arraysetops"] = _alias_numpy_arraysetops()
    APPLIED["symbolic_helper._set_opset_version"] = _restore_set_opset_version()
    APPLIED["torch._C.Node.__getitem__"] = _node_getitem()
    APPLIED["BoundedModule._named_members(remove_duplicate)"] = _named_members_remove_duplicate()

