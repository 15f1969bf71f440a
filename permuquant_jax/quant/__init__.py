"""PermuQuant: calibration, permutation sites, choice and acceptance, folding, baselines, quantized linear.

Entry points: `quantize_model` (any Flax NNX model), `quantize_flux` (the FLUX plan), `choose_for_layer`
(one layer from its activations), `joint_order` (the paper's criterion).
"""

from permuquant_jax.quant.api import CFGForward, RolloutForward, quantize_model, rollout_batches
from permuquant_jax.quant.baselines import METHODS, smoothquant_scales
from permuquant_jax.quant.calibrate import CalibrationStats, LayerStats, calibrate
from permuquant_jax.quant.downstream import block_errors
from permuquant_jax.quant.flux_plan import (
    FLUX_KEEP,
    FluxBatches,
    flux_calibration_batches,
    flux_rollout_batches,
    flux_schedule,
    flux_sites,
    quantize_flux,
)
from permuquant_jax.quant.fold import fold_permutation, fold_smoothing
from permuquant_jax.quant.linear import QuantLinear
from permuquant_jax.quant.paths import find_linears
from permuquant_jax.quant.permute import accept, choose_for_layer, deal_order, joint_order, make_candidates
from permuquant_jax.quant.plan import apply_structure, plan_sites, plan_summary
from permuquant_jax.quant.report import QuantReport, SiteReport
from permuquant_jax.quant.sites import NormRef, Ref, Site, gather_sites

__all__ = [
    "CFGForward", "FLUX_KEEP", "FluxBatches", "RolloutForward", "flux_rollout_batches", "rollout_batches", "METHODS",
    "CalibrationStats", "LayerStats", "NormRef", "QuantLinear", "QuantReport",
    "Ref",
    "apply_structure", "block_errors", "plan_summary",
    "Site", "SiteReport", "accept", "calibrate", "choose_for_layer", "deal_order", "find_linears",
    "flux_calibration_batches", "flux_schedule", "flux_sites", "fold_permutation", "fold_smoothing",
    "gather_sites", "joint_order", "make_candidates", "plan_sites", "quantize_flux", "quantize_model",
    "smoothquant_scales",
]
