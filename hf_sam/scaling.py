"""Per-parameter rho multipliers and norm weights (rho_scaling).

Contract used by the trainer (keep the signature):
    layer_factors(model, named_params, config) -> tuple[list[float], list[float]] | None
model: the unwrapped model; named_params: [(name, parameter)] of the perturbed parameters.
Returns (s, q): per-parameter numerator factor s and denominator weight q, aligned with
named_params, so that e_p = rho * s_p * g_p / (sqrt(sum_k (q_k * ||g_k||)^2) + eps);
or None when no scaling applies (rho_scaling="none": s = q = 1).
"""


def layer_factors(model, named_params, config):
    if config.rho_scaling == "none":
        return None
    raise NotImplementedError(f"rho_scaling={config.rho_scaling!r} is not implemented yet")
