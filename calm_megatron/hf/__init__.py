"""Hugging Face interchange in the reference CALM format (calm-hf-format doc), both ways.

- :func:`export_checkpoint` (``tools/convert_to_hf.py``): a step of ours at any TP/PP/DP layout ->
  an HF folder (reference ``Autoencoder`` / ``EnergyTransformer``, or stock ``LlamaForCausalLM``),
  streaming one tensor at a time; :func:`validate_export` reloads it through transformers and
  compares outputs with our model.
- :func:`import_hf` (``tools/convert_from_hf.py``): an HF folder -> a complete step of ours at any
  TP/PP, loadable with ``checkpoint.load=<out> checkpoint.finetune=true``.
- :func:`load_model` / :func:`load_hf_as_ours`: our model (TP=1, this process) from either kind of
  path, for evaluation and generation tools.

``configuration_*.py`` and ``modeling_*.py`` in this folder are shipped with exported weights and
import only torch and transformers. Everything else here is calm-megatron code; transformers is
imported through :func:`calm_megatron.hf._compat.import_transformers` (CPU torchvision workaround),
which this package runs before anything else touches transformers.
"""
from calm_megatron.hf._compat import import_transformers

import_transformers()

from calm_megatron.hf.export import export_checkpoint  # noqa: E402
from calm_megatron.hf.importer import import_hf  # noqa: E402
from calm_megatron.hf.loading import (LoadedModel, load_checkpoint_model, load_hf_as_ours,  # noqa: E402
                                      load_hf_model, load_model)
from calm_megatron.hf.source import HFFormatError, HFSource, is_hf_folder  # noqa: E402
from calm_megatron.hf.validate import ValidationError, validate_export  # noqa: E402

__all__ = ["export_checkpoint", "import_hf", "load_model", "load_hf_as_ours", "load_hf_model",
           "load_checkpoint_model", "LoadedModel", "is_hf_folder", "HFSource", "HFFormatError",
           "validate_export", "ValidationError", "import_transformers"]
