"""Model math: the chunk autoencoder, the backbone, the energy head, CALM and the AR baseline.

Nothing here imports ``training/`` or ``data/``: models are pure functions of their inputs.
"""


def build_model(cfg, autoencoder=None):
    """The model of ``cfg.run.stage`` for this rank: ae -> Autoencoder, calm -> CALM, ar -> ARModel.

    Stage calm needs the trained ``autoencoder`` (loaded by the caller from
    ``model.autoencoder_checkpoint``); it is frozen inside the CALM.
    """
    precision = cfg.train.precision
    if cfg.run.stage == "ae":
        from calm_megatron.models.autoencoder import build_autoencoder

        return build_autoencoder(cfg.autoencoder, precision)
    if cfg.run.stage == "calm":
        from calm_megatron.models.calm import build_calm

        if autoencoder is None:
            raise ValueError("run.stage=calm needs the frozen autoencoder: load it from "
                             "model.autoencoder_checkpoint and pass it to build_model")
        return build_calm(cfg.model, autoencoder, precision, parallel=cfg.parallel)
    if cfg.run.stage == "ar":
        from calm_megatron.models.ar import build_ar

        return build_ar(cfg.model, precision, parallel=cfg.parallel)
    raise ValueError(f"run.stage={cfg.run.stage!r} is not one of ae, calm, ar")
