"""GLUE metrics with scikit-learn / scipy (HF `evaluate` would need the Hub)."""

from __future__ import annotations

import numpy as np


def task_metrics(task: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """All metrics the papers report for the task, in percent (as the paper's tables)."""
    # imported here: scipy + scikit-learn add ~2 s to every start-up, error exits included
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if task == "stsb":
        if np.std(predictions) == 0:
            return {"pearson": 0.0, "spearman": 0.0}
        return {
            "pearson": 100 * float(pearsonr(predictions, labels)[0]),
            "spearman": 100 * float(spearmanr(predictions, labels)[0]),
        }
    out = {"accuracy": 100 * float(accuracy_score(labels, predictions))}
    if task == "cola":
        out["matthews_correlation"] = 100 * float(matthews_corrcoef(labels, predictions))
    if task in ("mrpc", "qqp"):
        out["f1"] = 100 * float(f1_score(labels, predictions))
    return out
