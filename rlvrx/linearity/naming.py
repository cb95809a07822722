"""Which module type (q, k, v, o, gate, ...) and which layer a tensor belongs to, from its name."""

from __future__ import annotations

import re

MODULES = ("embed", "q", "k", "v", "o", "gate", "up", "down", "norm", "head", "other")
_MODULE_PATTERNS = (
    ("norm", re.compile(r"norm|(^|\.)ln_?\w*\.")),
    ("embed", re.compile(r"embed_tokens|(^|\.)wte\.|word_embeddings|embed_in\.|tok_embeddings")),
    ("head", re.compile(r"lm_head|embed_out\.|(^|\.)output\.weight$")),
    ("q", re.compile(r"q_proj|\.wq\.|\.query\.")),
    ("k", re.compile(r"k_proj|\.wk\.|\.key\.")),
    ("v", re.compile(r"v_proj|\.wv\.|\.value\.")),
    ("o", re.compile(r"o_proj|out_proj|\.wo\.|attn\.c_proj|attention\.dense|attention\.output\.dense")),
    ("gate", re.compile(r"gate_proj|\.w1\.")),
    ("up", re.compile(r"up_proj|\.w3\.|c_fc|fc1|dense_h_to_4h")),
    ("down", re.compile(r"down_proj|\.w2\.|mlp\.c_proj|fc2|dense_4h_to_h")),
)
_LAYER = re.compile(r"\.(?:layers|h|blocks|layer|decoder\.layers)\.(\d+)\.")


def module_of(name: str) -> str:
    for module, pattern in _MODULE_PATTERNS:
        if pattern.search(name):
            return module
    return "other"


def layer_of(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None
