"""Configuration of the CALM chunk autoencoder, in the reference CALM release's format.

Shipped next to exported weights: imports only transformers (no calm_megatron). The fields and
their meaning are those of the reference ``Autoencoder`` config.json (see the calm-hf-format doc).
"""
from transformers import PretrainedConfig


class AutoencoderConfig(PretrainedConfig):
    """K tokens <-> one latent vector: a context-free encoder/decoder of SwiGLU layers (no attention)."""

    model_type = "autoencoder"

    def __init__(
        self,
        vocab_size=128257,
        hidden_size=512,
        intermediate_size=1280,
        num_encoder_layers=2,
        num_decoder_layers=2,
        latent_size=128,
        patch_size=4,
        ae_dropout=0.15,
        kl_clamp=0.5,
        kl_weight=0.001,
        hidden_act="silu",
        max_position_embeddings=2048,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        mlp_bias=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_encoder_layers = num_encoder_layers
        self.num_decoder_layers = num_decoder_layers
        self.latent_size = latent_size
        self.patch_size = patch_size
        self.ae_dropout = ae_dropout
        self.kl_clamp = kl_clamp
        self.kl_weight = kl_weight
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.mlp_bias = mlp_bias
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
