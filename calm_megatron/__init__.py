"""calm-megatron: distributed pretraining of Continuous Autoregressive Language Models."""
import warnings

# Megatron-Core warns at import time, once per module, that it falls back to local kernels when
# apex / Transformer Engine are missing; distributed.init logs the active path once instead.
warnings.filterwarnings("ignore", message=r".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=r".*Apex is not installed.*")
warnings.filterwarnings("ignore", message=r".*transformer_engine.*not installed.*", category=UserWarning)

__version__ = "0.1.0"
