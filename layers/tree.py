"""Nested weight trees (`Layer.weights_tree()`) as flat {path: leaf} maps and back.

Paths are the checkpoint's and the HF mapping's: `blocks/3/attn/q_proj/kernel`.
"""
from __future__ import annotations


def flatten_weights(tree: dict, prefix: str = "") -> dict:
    """{path: leaf} of a nested weights tree (the same paths the mapping uses)."""
    flat = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_weights(value, f"{prefix}{name}/"))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                flat.update(flatten_weights(item, f"{prefix}{name}/{i}/"))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def unflatten_weights(flat: dict) -> dict:
    """The nested weights tree of {path: leaf} (inverse of flatten_weights; numeric parts are list items)."""
    tree: dict = {}
    for path, leaf in flat.items():
        parts = path.split("/")
        node = tree
        for part, following in zip(parts[:-1], parts[1:]):
            default = [] if following.isdigit() else {}
            if isinstance(node, list):
                index = int(part)
                while len(node) <= index:
                    node.append(None)
                node[index] = node[index] if node[index] is not None else default
                node = node[index]
            else:
                node = node.setdefault(part, default)
        node[parts[-1]] = leaf
    return tree
