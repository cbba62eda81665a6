"""Which modules a ``[peft].target_modules`` list names, checked as PEFT matches names.

``lorakit run`` checks the list against the loaded model (:mod:`lorakit.modeling`);
``lorakit plan`` checks it against the module names of the config's layout, where the model
type's layout is known, so a misspelt name is refused before anything is loaded. No torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from lorakit.errors import ModelError
from lorakit.memory_plan import LINEAR_NAMES, ModelShape

# Model types whose transformers modules are named as Llama's (model.layers.N.self_attn.q_proj,
# .mlp.gate_proj, ...). Others (phi3's fused qkv_proj, gemma3's vision tower) are not checked.
LLAMA_LAYOUT_MODELS = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "olmo2", "smollm3"}
)
# Per layer, besides the linear layers: every other module any of those types has (the norms
# differ between them; a name one of them has is never refused for another, only missed).
_LAYER_MODULES = (
    "self_attn",
    "self_attn.q_norm",
    "self_attn.k_norm",
    "self_attn.rotary_emb",
    "mlp",
    "mlp.act_fn",
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)
_LINEAR_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn"}
_LINEAR_PARENT |= {"o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def unmatched(module_names: Iterable[str], targets: Sequence[str]) -> list[str]:
    """The names in ``targets`` that match none of ``module_names`` (PEFT's rule: the full
    name, or its last dotted parts)."""
    names = list(module_names)
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def layout_module_names(shape: ModelShape) -> list[str] | None:
    """The module names a causal LM of ``shape`` has once loaded, or None when its model type's
    layout is not known here."""
    if shape.model_type not in LLAMA_LAYOUT_MODELS:
        return None
    names = ["model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb"]
    names.append("lm_head")
    for i in range(shape.layers):
        layer = f"model.layers.{i}"
        names.append(layer)
        names += [f"{layer}.{m}" for m in _LAYER_MODULES]
        names += [f"{layer}.{_LINEAR_PARENT[n]}.{n}" for n in LINEAR_NAMES]
    return names


def layout_linear_names() -> list[str]:
    """The last names of the linear layers of the Llama layout (as the run's fix lists them)."""
    return sorted({*LINEAR_NAMES, "lm_head"})


def target_modules_error(names: Sequence[str], linear_names: Sequence[str]) -> ModelError:
    """The error for target names that match no module of the model (plan and run say the same)."""
    return ModelError(
        f"{', '.join(map(repr, sorted(names)))} in target_modules matches no module of this model",
        where="[peft].target_modules",
        fix=f'use "all-linear" or some of: {", ".join(linear_names)}',
    )
