"""Evaluation metrics on embeddings: kNN label transfer and view retrieval recall@1.

Used by :mod:`concept.evaluate` for the model and the baseline alike.
"""

from __future__ import annotations

import numpy as np
import torch

from concept import losses


def knn_predict(ref: np.ndarray, ref_labels: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Majority label of each query row's ``k`` nearest reference rows (Euclidean; on
    L2-normalized embeddings the cosine order)."""
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=min(k, len(ref)), algorithm="brute")
    return clf.fit(ref, ref_labels).predict(query)


def classification_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 (sklearn: over the labels in truth or prediction)."""
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


def view_recall(z1: np.ndarray, z2: np.ndarray) -> float:
    """Recall@1 of matching the two views of each cell (cosine; both directions)."""
    a = torch.nn.functional.normalize(torch.as_tensor(z1, dtype=torch.float32), dim=-1)
    b = torch.nn.functional.normalize(torch.as_tensor(z2, dtype=torch.float32), dim=-1)
    return float(losses.recall_at_k(a @ b.T, 1))
