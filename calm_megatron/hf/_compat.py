"""Import Hugging Face transformers in environments where torchvision is broken or stubbed.

transformers decides once, when ``transformers.utils.import_utils`` is first imported, whether
torchvision is available; if it finds a module it later imports ``torchvision.transforms.InterpolationMode``
and the like. On CPU machines PyPI's torchvision is built against the CUDA torch and fails to import
("operator torchvision::nms does not exist"), and ``calm_megatron.data.streaming_compat`` may have
registered a small torchvision stub for MosaicML Streaming. Neither can serve transformers' vision code,
which the language models never use, so while transformers takes its inventory we make torchvision look
absent, then put back whatever was there. A real torchvision that is already imported is left alone;
one that is not is not tried (a failing import costs seconds, and the CALM models need no vision).
"""
from __future__ import annotations

import importlib
import sys


def _real_torchvision_loaded() -> bool:
    module = sys.modules.get("torchvision")
    return module is not None and not getattr(module, "__calm_megatron_stub__", False)


def import_transformers():
    """Return the ``transformers`` module, importable whatever state torchvision is in."""
    if _real_torchvision_loaded():
        return importlib.import_module("transformers")
    inventory = sys.modules.get("transformers.utils.import_utils")
    if inventory is not None:
        # Imported earlier (MosaicML Streaming imports transformers) while a stub stood in for
        # torchvision: correct the recorded availability, which is what transformers consults.
        inventory._torchvision_available = False
        return importlib.import_module("transformers")
    saved = {n: m for n, m in sys.modules.items() if n == "torchvision" or n.startswith("torchvision.")}
    for name in saved:
        del sys.modules[name]
    sys.modules["torchvision"] = None  # find_spec -> None: transformers records "not available"
    try:
        importlib.import_module("transformers.utils.import_utils")
    finally:
        del sys.modules["torchvision"]
        sys.modules.update(saved)
    return importlib.import_module("transformers")
