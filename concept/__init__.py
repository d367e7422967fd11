"""Contrastive single-cell models on compiled token stores (scConcept-compatible).

``from concept import Concept`` loads a trained model (:mod:`concept.api`); the package's
command lines are ``concept.train``, ``concept.embed`` and ``concept.evaluate``.
"""


def __getattr__(name: str):
    # lazy: the training entry points and the data loader need no API imports
    if name in ("Concept", "estimate_mutual_information"):
        from concept import api

        return getattr(api, name)
    raise AttributeError(f"module 'concept' has no attribute {name!r}")


__all__ = ["Concept", "estimate_mutual_information"]
