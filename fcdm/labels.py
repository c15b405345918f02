"""Class labels by number or by name: ImageNet-1k's id-to-label table, bundled with fcdm.

    IMAGENET_ID2LABEL[207]                          # 'golden retriever'
    class_ids([207, "otter", "tench"], num_classes=1000)   # [207, 360, 0]

Each label is the class's WordNet synonyms, comma-separated ("tench, Tinca tinca"); any one synonym names the class,
case-insensitive. A synonym shared by several classes ("partridge", "grass snake") names the class whose first
synonym it is, else it is refused with the candidates listed.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Iterable, Mapping


def _load_imagenet() -> dict[int, str]:
    text = resources.files("fcdm").joinpath("imagenet_labels.json").read_text(encoding="utf-8")
    return {int(k): v for k, v in json.loads(text).items()}


IMAGENET_ID2LABEL: dict[int, str] = _load_imagenet()


@lru_cache(maxsize=4)
def _name_index(id2label_items: tuple) -> dict[str, list[int]]:
    """synonym (lower case) -> the classes it names, the class whose first synonym it is first."""
    index: dict[str, list[int]] = {}
    for class_id, label in id2label_items:
        for rank, synonym in enumerate(s.strip().lower() for s in label.split(",")):
            ids = index.setdefault(synonym, [])
            ids.insert(0 if rank == 0 else len(ids), class_id)
    return index


def class_id(label, num_classes: int, id2label: Mapping[int, str] | None = None) -> int:
    """One class label (an int, a numeric string or a class name) -> its class number; ValueError naming it."""
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, int) and not isinstance(label, bool):
        if not 0 <= label < num_classes:
            raise ValueError(f"class label {label} is out of range: the model has {num_classes} classes (0.."
                             f"{num_classes - 1})")
        return label
    if not isinstance(label, str):
        raise ValueError(f"a class label must be an int or a class name, got {label!r}")
    id2label = IMAGENET_ID2LABEL if id2label is None else id2label
    ids = _name_index(tuple(sorted(id2label.items()))).get(label.strip().lower(), [])
    first = [i for i in ids if id2label[i].split(",")[0].strip().lower() == label.strip().lower()]
    if len(ids) > 1 and len(first) != 1:
        raise ValueError(f"class name {label!r} is ambiguous: it names classes {ids} "
                         f"({'; '.join(id2label[i] for i in ids)}); pass the number")
    if not ids:
        raise ValueError(f"unknown class name {label!r}; pass a class number or an ImageNet class name such as "
                         f"'golden retriever' (fcdm.labels.IMAGENET_ID2LABEL lists them)")
    return class_id(first[0] if first else ids[0], num_classes, id2label)


def class_ids(labels: Iterable, num_classes: int, id2label: Mapping[int, str] | None = None) -> list[int]:
    """Class labels (ints, numeric strings or class names) -> class numbers, each checked against num_classes."""
    labels = [labels] if isinstance(labels, (int, str)) else list(labels)
    if not labels:
        raise ValueError("class_labels is empty: pass at least one class")
    return [class_id(label, num_classes, id2label) for label in labels]


__all__ = ["IMAGENET_ID2LABEL", "class_id", "class_ids"]
