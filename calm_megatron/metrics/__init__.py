"""Evaluation metrics that need a model only through callables (no model classes imported here).

:mod:`calm_megatron.metrics.brier` holds the BrierLM estimators (calm-spec section 3): the CALM
teacher-forced estimator (K >= 4), the CALM rollout estimator (K < 4), the Rao-Blackwellised
estimator of the autoregressive baseline, and :class:`~calm_megatron.metrics.brier.BrierAccumulator`,
which sums estimates exactly and reduces them across data-parallel ranks.
"""
