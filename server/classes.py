"""Class-label resolution for the API: the library's catalog (amskv/classes.py), errors as 422 responses."""
from __future__ import annotations

from amskv.classes import ClassCatalog, ClassEntry, ClassLabelError
from server.errors import InvalidRequest

__all__ = ["ClassCatalog", "ClassEntry", "resolve_labels"]


def resolve_labels(catalog: ClassCatalog, labels: list[int | str]) -> list[int]:
    """Indices for a request's class_labels; a bad label is a 422 naming its position."""
    try:
        return catalog.resolve_all(labels)
    except ClassLabelError as exc:
        raise InvalidRequest(f"{exc}; GET /v1/classes lists the classes", param=f"class_labels[{exc.position}]",
                             code="unknown_class_label") from None
