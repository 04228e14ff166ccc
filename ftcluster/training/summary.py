"""The run summary (OUTPUT/summary.json): what was trained, how fast, at what cost, and how much better."""

from __future__ import annotations

from typing import Any

from ftcluster.evaluation.forgetting import verdict as forgetting_verdict
from ftcluster.evaluation.metrics import scalar_metrics
from ftcluster.track.cost import cost_per_point, run_cost
from ftcluster.track.flops import model_flops_utilization
from ftcluster.training.setup import peak_memory_mb


def run_summary(setup, state, before: dict, after: dict) -> dict[str, Any]:
    """``setup``: training.setup.Setup; ``state``: the loop's RunState at the end of training."""
    spec, window = setup.spec, state.window
    seconds, tokens = window.train_seconds, window.tokens_seen
    final_scores = scalar_metrics(after)
    summary: dict[str, Any] = {
        "name": spec.name, "method": spec.method.name, "model": spec.model.path,
        "steps": state.step, "total_steps": setup.total_steps, "epochs": round(setup.order.epoch_of(state.step), 4),
        "stop_reason": state.stop_reason,
        "tokens": tokens, "train_seconds": round(seconds, 3), "eval_seconds": round(state.eval_seconds, 3), "tokens_per_s": tokens / seconds if seconds else 0.0,
        "trainable_params": setup.counts.trainable, "total_params": setup.counts.total,
        "world_size": setup.ctx.world_size, "precision": setup.precision, "device": str(setup.device),
        "peak_memory_mb": peak_memory_mb(setup.device), "load_peak_memory_mb": setup.load_peak_mb,
        "rss_before_model_mb": setup.rss_before_model_mb,
        "before": scalar_metrics(before), "after": final_scores,
        "samples": {"before": before.get("samples", []), "after": after.get("samples", [])},
        "best": state.stopper.best_record(),
        "resumed_from_step": state.start_step if state.resumed else None,
        "flops_per_token": state.flops.total,
        "mfu": model_flops_utilization(tokens / seconds, state.flops.total, state.device_flops, setup.ctx.world_size)
        if seconds else None,
        "device_kind": state.kind,
        **run_cost(seconds, state.devices, state.kind, spec.cost),
        "skipped_nonfinite_steps": state.guard.skipped,
    }
    summary["cost_per_million_tokens_usd"] = (
        summary["cost_usd"] / tokens * 1e6 if summary["cost_usd"] is not None and tokens else None
    )
    summary["cost_per_point_usd"] = cost_per_point(
        summary["cost_usd"], summary["before"].get(spec.eval.metric), final_scores.get(spec.eval.metric), spec.eval.mode
    )
    if before.get("few_shot"):
        summary["few_shot"] = {k: v for k, v in before["few_shot"].items() if k != "samples"}
    if spec.eval.forgetting and before:
        summary["forgetting"] = forgetting_verdict(before, after, spec.eval.forgetting)
    if setup.bundle.label_names is not None and "confusion_matrix" in after:
        summary["confusion"] = {"labels": setup.bundle.label_names, "matrix": after["confusion_matrix"]}
    # Kept in the summary so a sweep can replay it if Tune never saw it (interrupted right after).
    summary["final_report"] = {**state.report_fields, "step": state.step, **final_scores, "completed": 1}
    return summary
