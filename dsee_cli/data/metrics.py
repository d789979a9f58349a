"""GLUE metrics with scikit-learn / scipy (HF `evaluate` would need the Hub)."""

from __future__ import annotations

import numpy as np


def trivial_metrics(task: str, train_labels: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The score of the trivial predictor that ignores its input: the training set's majority class
    (its mean for regression, whose correlation is 0 by definition). A score means something only
    above this."""
    if task == "stsb":
        constant = np.full(len(labels), float(np.mean(train_labels)) if len(train_labels) else 0.0)
    else:
        values, counts = np.unique(train_labels, return_counts=True)
        constant = np.full(len(labels), values[np.argmax(counts)] if len(values) else 0)
    return task_metrics(task, constant, labels)


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
