"""Import MosaicML Streaming where torchvision cannot be imported.

`streaming/__init__` imports its vision datasets unconditionally, and those import torchvision
(`streaming/vision/base.py`: `torchvision.datasets.VisionDataset`, `torchvision.transforms.functional.to_tensor`;
`streaming/vision/convert/cifar10.py`: `torchvision.datasets.CIFAR10`). PyPI's torchvision wheel is built
against the CUDA torch and fails to import with the CPU build ("operator torchvision::nms does not exist"),
and CPU machines may not have it at all. The text/MDS path never touches torchvision, so when the real one
cannot be imported we register small stub modules that raise a clear error if anything actually uses them.
On GPU clusters the real torchvision imports and is used unchanged.

Every module of this project imports streaming through `import_streaming()`.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types

STUB_MARKER = "__calm_megatron_stub__"
_STUB_ERROR = ("torchvision is not usable in this environment (it failed to import, typically a CUDA "
               "torchvision wheel beside a CPU torch); calm-megatron registered a stub so that MosaicML "
               "Streaming's text/MDS path works. Install a torchvision that matches torch to use {what}.")


class _StubVisionDataset:
    """Placeholder base class so that `streaming.vision` can define its dataset classes."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(_STUB_ERROR.format(what="torchvision datasets"))


def _unusable(name: str):
    def call(*args, **kwargs):
        raise RuntimeError(_STUB_ERROR.format(what=f"torchvision {name}"))
    call.__name__ = name.rsplit(".", 1)[-1]
    return call


def _make_module(name: str, attrs: dict) -> types.ModuleType:
    module = types.ModuleType(name, "calm-megatron stub: the real torchvision could not be imported.")
    # A real spec keeps importlib.util.find_spec (used by transformers' availability checks) working.
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    module.__path__ = []
    setattr(module, STUB_MARKER, True)
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


def _install_torchvision_stub() -> None:
    """Replace any partially imported torchvision with stub modules in sys.modules."""
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    datasets = _make_module("torchvision.datasets", {
        "VisionDataset": _StubVisionDataset,
        "CIFAR10": type("CIFAR10", (_StubVisionDataset,), {}),
        "CIFAR100": type("CIFAR100", (_StubVisionDataset,), {}),
        "ImageFolder": type("ImageFolder", (_StubVisionDataset,), {}),
    })
    functional = _make_module("torchvision.transforms.functional", {
        "to_tensor": _unusable("transforms.functional.to_tensor"),
    })
    transforms = _make_module("torchvision.transforms", {"functional": functional})
    root = _make_module("torchvision", {
        "__version__": "0.0.0+calm_megatron_stub",
        "datasets": datasets,
        "transforms": transforms,
    })
    sys.modules.update({
        "torchvision": root,
        "torchvision.datasets": datasets,
        "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional,
    })


def torchvision_is_stubbed() -> bool:
    """True when the torchvision in sys.modules is our stub."""
    module = sys.modules.get("torchvision")
    return bool(module is not None and getattr(module, STUB_MARKER, False))


def _ensure_torchvision_importable() -> None:
    if "torchvision" in sys.modules:
        return
    try:
        importlib.import_module("torchvision")
    except (ImportError, RuntimeError, OSError, AttributeError):
        _install_torchvision_stub()


def import_streaming() -> types.ModuleType:
    """Return the `streaming` module, stubbing torchvision first when the real one cannot be imported."""
    if "streaming" not in sys.modules:
        _ensure_torchvision_importable()
    return importlib.import_module("streaming")
