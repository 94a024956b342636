"""Where a model comes from: a registry name, an ONNX file, a user's callable, or a module given to the Python API.

``model`` (``--model``) is one of

- a registry name (``cnn-small``, :mod:`certprune.models`): built for the data set's shape from torch's (or the
  config's ``weight_init``) weights;
- ``path/to/model.onnx``: a feed-forward network read by the ONNX importer
  (:func:`certprune.certify.onnx_import.load_onnx`), whose weights are the dense starting point;
- ``package.module:factory`` or ``path/to/file.py:factory``: a callable returning an ``nn.Module``;
- ``memory:<class>``: a module handed to :func:`certprune.prune` (the API keeps it; no file can rebuild it).

``weights`` (``--weights FILE``) is a state_dict for a callable's or a registry model's module, read with
``torch.load(weights_only=True)``. Every model but a plain registry one has an origin: its kind, the file that
defines it and that file's sha256 (and the weights file's), or the callable's name. The run keeps it in its config
(``model_origin``), its metrics and its model file, so the ordinary settings comparison refuses a resume or a sweep
whose file has changed, and :func:`rebuild` (behind :func:`certprune.runs.load_run`) rebuilds a run's module from
that file only while its hash is unchanged. What a user's model expects of its images is :mod:`certprune.inputs`';
what a built model cannot take, :mod:`certprune.model_checks`'.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import importlib.util
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .inputs import inputs_of, prepared
from .model_checks import check, check_fits, first_line
from .models import MODELS, VERIFIABLE, WEIGHT_INITS, create_model, initialise

REGISTRY, ONNX, CALLABLE, MEMORY = "registry", "onnx", "callable", "memory"
CALLABLE_FORM = "package.module:factory or path/to/file.py:factory"
def kind_of(spec: str) -> str:
    """Which of the four forms ``spec`` is; a one-line ValueError for none."""
    if spec in MODELS:
        return REGISTRY
    prefix, _, rest = spec.partition(":")
    if prefix == MEMORY and rest:
        return MEMORY
    if spec.lower().endswith(".onnx"):
        return ONNX
    target, colon, factory = spec.rpartition(":")
    if target and all(part.isidentifier() for part in factory.split(".")):
        return CALLABLE
    raise ValueError(f"unknown model {spec!r}; choose from {', '.join(sorted(MODELS))}, a file.onnx, or a callable "
                     f"{CALLABLE_FORM}")


def check_settings(config) -> str:
    """The config's model settings checked together (a config validator's part); returns the model's kind."""
    try:
        kind = kind_of(config.model)
    except ValueError as error:
        raise ValueError(f"model: {error}") from None
    # ibp lacks Shi et al.'s residual halving, and would overwrite weights given with the model
    inits = WEIGHT_INITS if config.model in VERIFIABLE and config.weights is None else ("default",)
    if config.weight_init not in inits:
        raise ValueError(f"weight_init: {config.weight_init!r}; model {config.model}"
                         f"{' with weights' if config.weights else ''} takes {', '.join(inits)}")
    if kind == ONNX and config.weights is not None:
        raise ValueError(f"weights: the ONNX file {config.model} carries its own weights; weights is for a callable "
                         "or a registry model")
    if kind == REGISTRY and inputs_of(config) is not None:
        raise ValueError(f"inputs: model {config.model} normalises its own inputs; inputs is for a user's model "
                         "(a file.onnx or a callable)")
    return kind


def is_given(spec: str, weights: str | None) -> bool:
    """Whether the model arrives with weights of its own (a file, a callable, a state_dict): they are the dense
    starting point, which the command line then trains only when asked."""
    return kind_of(spec) != REGISTRY or weights is not None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _existing(path: str, what: str) -> Path:
    if not Path(path).is_file():
        raise ValueError(f"{what} {path} does not exist")
    return Path(path).resolve()


@contextmanager
def _cwd_on_path():
    """A ``package.module`` is found from the current directory too, as ``python -m`` would."""
    here = os.getcwd()
    sys.path.insert(0, here)
    try:
        yield
    finally:
        sys.path.remove(here)


def _module_file(spec: str, module: str) -> Path:
    try:
        with _cwd_on_path():
            found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.origin or not Path(found.origin).is_file():
        raise ValueError(f"model {spec}: no module named {module!r} (searched with the current directory on the path)")
    return Path(found.origin).resolve()


def origin(spec: str, weights: str | None = None) -> dict[str, Any] | None:
    """Where ``spec`` (and ``weights``) come from, with each file's sha256; None for a plain registry model, whose
    name says it all. A missing file or module is a one-line ValueError."""
    kind = kind_of(spec)
    if kind == REGISTRY and weights is None:
        return None
    if kind == MEMORY:
        record = {"kind": MEMORY, "class": spec.partition(":")[2]}
    elif kind == REGISTRY:
        record = {"kind": REGISTRY, "name": spec}
    elif kind == ONNX:
        path = _existing(spec, "ONNX file")
        record = {"kind": ONNX, "file": str(path), "sha256": _sha256(path)}
    else:
        target, _, factory = spec.rpartition(":")
        module = None if target.endswith(".py") else target
        path = _existing(target, "model file") if module is None else _module_file(spec, module)
        record = {"kind": CALLABLE, "callable": spec, "module": module, "factory": factory, "file": str(path),
                  "sha256": _sha256(path)}
    if weights is not None:
        path = _existing(weights, "weights file")
        record["weights"] = {"file": str(path), "sha256": _sha256(path)}
    return record


def with_origin(config):
    """``config`` with a fresh ``model_origin`` (the files as they are now): what the command line and the API run."""
    return config.model_copy(update={"model_origin": origin(config.model, config.weights)})


def _unchanged(path: str, sha256: str) -> None:
    if not Path(path).is_file():
        raise ValueError(f"the model was made from {path}, which no longer exists")
    now = _sha256(Path(path))
    if now != sha256:
        raise ValueError(f"the model was made from {path}, which has changed since (sha256 {sha256[:12]}... then, "
                         f"{now[:12]}... now); restore that file, or start a new run from it")


def _import(record: dict[str, Any]):
    """The module that defines a callable: imported by name, or executed from its file under a name of its hash."""
    try:
        if record["module"] is not None:
            with _cwd_on_path():
                return importlib.import_module(record["module"])
        name = f"certprune_user_{record['sha256'][:16]}"
        if name not in sys.modules:
            found = importlib.util.spec_from_file_location(name, record["file"])
            module = importlib.util.module_from_spec(found)
            sys.modules[name] = module
            try:
                found.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        return sys.modules[name]
    except Exception as error:  # the user's code may raise anything while it is imported
        raise ValueError(f"model {record['callable']}: importing {record['file']} failed "
                         f"({type(error).__name__}: {first_line(error)})") from None


def _call(record: dict[str, Any]) -> nn.Module:
    spec = record["callable"]
    try:
        factory = functools.reduce(getattr, record["factory"].split("."), _import(record))
    except AttributeError:
        raise ValueError(f"model {spec}: {record['file']} defines no {record['factory']!r}") from None
    if not callable(factory):
        raise ValueError(f"model {spec}: {record['factory']} is a {type(factory).__name__}, not a callable")
    try:
        model = factory()
    except Exception as error:  # the user's code may raise anything
        raise ValueError(f"model {spec}: {record['factory']}() failed ({type(error).__name__}: "
                         f"{first_line(error)})") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {spec}: {record['factory']}() returned an object of type {type(model).__name__}, "
                         "not a torch.nn.Module")
    return model


def _skeleton(record: dict[str, Any], shape: dict[str, int], given: nn.Module | None) -> nn.Module:
    """The module an origin names, before any weights file: a file is read only while its hash is the recorded one."""
    kind = record["kind"]
    if kind == REGISTRY:
        return create_model(record["name"], **shape)
    if kind == MEMORY:
        if given is None:
            raise ValueError(f"the model ({record['class']}) was given in memory to the Python API, so no file can "
                             "rebuild it; load model.pt's state_dict into your own module")
        return copy.deepcopy(given)
    _unchanged(record["file"], record["sha256"])
    if kind == CALLABLE:
        return _call(record)
    from .certify.onnx_import import load_onnx

    try:
        model, input_shape = load_onnx(record["file"])
    except ValueError as error:  # the importer names the operator; the file, where it does not
        raise ValueError(str(error) if record["file"] in str(error) else f"{record['file']}: {error}") from None
    images = (shape["in_channels"], shape["image_size"], shape["image_size"])
    if tuple(input_shape) != images:
        raise ValueError(f"the ONNX model {record['file']} takes inputs of shape {tuple(input_shape)}, but the data "
                         f"set's images are {images}")
    return model


def _load_weights(model: nn.Module, path: str, spec: str) -> None:
    """A state_dict (or a checkpoint holding one under ``state_dict``) into ``model``, in one-line errors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged or unsafe file
        unsafe = "Unsupported global" in str(error) or "GLOBAL" in str(error)
        raise ValueError(f"cannot read weights file {path}: " + (
            "it holds Python objects beyond tensors, which certprune never loads (save model.state_dict() instead)"
            if unsafe else "it is damaged or not a file torch.save wrote")) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {path} holds no state_dict (a mapping of parameter names to tensors)")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0]).rstrip(".")
        raise ValueError(f"weights file {path} does not fit model {spec} ({detail})") from None


def build(config, data, given: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The config's dense model for ``data`` as it starts, checked (:func:`check_fits`, :func:`check`), and the
    architecture record that :func:`certprune.runs.build_model` rebuilds it from. ``given``: the API's module."""
    record = config.model_origin if config.model_origin is not None else origin(config.model, config.weights)
    architecture = {"name": config.model, "kwargs": data.shape()}
    if record is None:
        model = initialise(create_model(config.model, **data.shape()), config.weight_init)
    else:
        model = _skeleton(record, data.shape(), given)
        if "weights" in record:
            _unchanged(record["weights"]["file"], record["weights"]["sha256"])
            _load_weights(model, record["weights"]["file"], config.model)
        architecture["origin"] = record
        inputs = inputs_of(config)
        if inputs is not None:
            architecture["inputs"] = inputs
        model = prepared(model, inputs, data.channels)
    check_fits(model, data, config.model)
    check(model, config)
    return model, architecture


def rebuild(architecture: dict[str, Any]) -> nn.Module:
    """The module of a run's model file, for its state_dict: built again from the origin it records."""
    shape = architecture["kwargs"]
    return prepared(_skeleton(architecture["origin"], shape, None), architecture.get("inputs"), shape["in_channels"])
