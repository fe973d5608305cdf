"""Class-label resolution shared by `amskv generate` and the API: indices, WordNet ids and names."""
from __future__ import annotations

import pytest

from amskv.classes import ClassCatalog, ClassLabelError


def test_demo_catalog_takes_digit_names_and_indices():
    catalog = ClassCatalog.for_model(10)
    assert catalog.resolve_all([3, "seven", "Seven ", "4"]) == [3, 7, 7, 4]
    with pytest.raises(ClassLabelError) as bad:
        catalog.resolve_all([1, "eleven"])
    assert bad.value.position == 1
    assert "unknown class name 'eleven'" in str(bad.value) and "zero, one, two" in str(bad.value)
    with pytest.raises(ClassLabelError, match=r"out of range \(allowed: 0\.\.9\)"):
        catalog.resolve_all([10])


def test_imagenet_catalog_resolves_indices_wordnet_ids_and_names():
    catalog = ClassCatalog.imagenet()
    assert len(catalog) == 1000
    assert catalog.resolve_all([207, "n01440764", "Golden Retriever", "980"]) == [207, 0, 207, 980]
    assert catalog.entries[0].names[0] == "tench"
    with pytest.raises(ClassLabelError) as ambiguous:  # "crane" is a bird (134) and a machine (517)
        catalog.resolve_all([1, "crane"])
    assert ambiguous.value.position == 1 and "n02012849" in str(ambiguous.value)
    with pytest.raises(ClassLabelError, match="unknown WordNet id"):
        catalog.resolve_all(["n99999999"])
    with pytest.raises(ClassLabelError) as unknown:
        catalog.resolve_all(["no such thing"])
    assert "0..999" in str(unknown.value) and "1000 class names" in str(unknown.value)


def test_a_long_label_is_clipped_in_the_error():
    with pytest.raises(ClassLabelError) as bad:
        ClassCatalog.for_model(10).resolve_all(["x" * 5000])
    assert "(5000 characters)" in str(bad.value) and len(str(bad.value)) < 300
