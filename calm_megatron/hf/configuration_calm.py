"""Configuration of a CALM energy Transformer, in the reference CALM release's format.

Shipped next to exported weights: imports only transformers (no calm_megatron). The backbone fields
are Llama's; ``patch_size`` (K), ``latent_size``, ``noise_size``, ``num_mlp_layers`` (energy head
blocks), ``num_samples`` (N head samples per position in training) and ``beta`` (the energy-score
exponent) describe CALM; ``ae_path`` names the autoencoder folder (relative paths are resolved
against this model's folder first).
"""
from transformers import PretrainedConfig


class CALMConfig(PretrainedConfig):
    """An energy-head CALM over a frozen chunk autoencoder."""

    model_type = "energy"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        ae_path=None,
        patch_size=4,
        latent_size=128,
        num_mlp_layers=4,
        num_samples=8,
        beta=1.0,
        noise_size=64,
        vocab_size=128257,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=None,
        hidden_act="silu",
        max_position_embeddings=2048,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        rope_theta=10000.0,
        rope_scaling=None,
        attention_bias=False,
        attention_dropout=0.0,
        mlp_bias=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.ae_path = ae_path
        self.patch_size = patch_size
        self.latent_size = latent_size
        self.num_mlp_layers = num_mlp_layers
        self.num_samples = num_samples
        self.beta = beta
        self.noise_size = noise_size
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
