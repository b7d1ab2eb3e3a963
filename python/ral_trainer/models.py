"""Architectures the trainer can patch, how to find their decoder layers, and tiny random
configs of each (for tests and the CPU demo; nothing is downloaded).

The patch works on any Hugging Face decoder whose self-attention modules call
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v, mask, scaling=...)``
with post-RoPE ``[B, H, T, D]`` tensors, which is what every family below does. The list
is the set that is tested (patched == unpatched, ``tests/trainer/test_patch.py``). Other
models are refused unless the caller opts in with ``allow_unlisted=True``; either way a
patched layer must dispatch through ``ALL_ATTENTION_FUNCTIONS`` (checked in its forward's
source, so a forward replaced by another library, e.g. verl's Qwen2-VL monkey patch, is
refused) and must not be a sliding-window layer.
"""

from __future__ import annotations

import inspect

import torch

# model_type (top-level or text sub-config) -> human-readable family
SUPPORTED_ARCHITECTURES = {
    "qwen2_5_vl": "Qwen2.5-VL",
    "qwen2_5_vl_text": "Qwen2.5-VL (text model)",
    "qwen2_vl": "Qwen2-VL",
    "qwen2_vl_text": "Qwen2-VL (text model)",
    "qwen3_vl": "Qwen3-VL",
    "qwen3_vl_text": "Qwen3-VL (text model)",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
    "qwen3_moe": "Qwen3-MoE",
    "llama": "Llama",
    "mistral": "Mistral (without a sliding window)",
    "gemma3_text": "Gemma 3 (text model; its full-attention layers)",
}

TINY_ARCHS = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen2", "qwen3", "qwen3_moe", "llama", "mistral", "gemma3_text")


class UnsupportedArchitectureError(ValueError):
    """The model's architecture is not one the trainer knows how to patch."""


def model_type(model) -> str:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", type(model).__name__)


def check_supported(model, allow_unlisted: bool = False) -> None:
    mt = model_type(model)
    if mt not in SUPPORTED_ARCHITECTURES and not allow_unlisted:
        names = ", ".join(sorted({v for v in SUPPORTED_ARCHITECTURES.values()}))
        raise UnsupportedArchitectureError(
            f"ral_trainer cannot patch model_type={mt!r} ({type(model).__name__}); supported: {names} "
            f"(model_type in {sorted(SUPPORTED_ARCHITECTURES)}). If its attention modules look their kernel up in "
            "transformers' ALL_ATTENTION_FUNCTIONS, opt in with patch_model(model, allow_unlisted=True)")


def check_patchable_layer(model, layers: torch.nn.ModuleList, i: int) -> None:
    """Raise :class:`UnsupportedArchitectureError` if decoder layer ``i``'s attention
    cannot take the fused op: a forward that does not dispatch through
    ``ALL_ATTENTION_FUNCTIONS`` (e.g. replaced by another library's patch), or a
    sliding-window layer (the fused op computes full causal attention)."""
    attn = layers[i].self_attn
    fwd = attn.__dict__.get("forward", type(attn).forward)
    try:
        src = inspect.getsource(fwd)
    except (OSError, TypeError):  # no source to read: the runtime checks still apply
        src = "ALL_ATTENTION_FUNCTIONS"
    routed = getattr(fwd, "_ral_routed", False)  # an adapter's forward that calls the patch itself
    if not routed and "ALL_ATTENTION_FUNCTIONS" not in src and "_attn_implementation" not in src:
        where = getattr(fwd, "__module__", "?")
        raise UnsupportedArchitectureError(
            f"layer {i} of {type(model).__name__}: {type(attn).__name__}.forward (from {where}) does not look its "
            "kernel up in transformers' ALL_ATTENTION_FUNCTIONS, so a patched layer would be bypassed and the "
            "attention term silently never computed. Patch the model before other libraries replace its attention "
            "forward, or turn their patch off")
    tc = getattr(attn, "config", None) or text_config(model)
    types = getattr(tc, "layer_types", None)
    kind = types[i] if types is not None and i < len(types) else None
    sliding = getattr(attn, "sliding_window", None) is not None or kind in ("sliding_attention", "chunked_attention")
    if kind is None and getattr(tc, "sliding_window", None) and getattr(tc, "use_sliding_window", True):
        sliding = True
    if sliding:
        full = [j for j, t in enumerate(types or []) if t == "full_attention"]
        hint = f"; its full-attention layers are {full}: patch_model(model, layers=[{full[-1]}])" if full else \
            " (set config.sliding_window=None only if every sequence is shorter than the window)"
        raise UnsupportedArchitectureError(
            f"layer {i} of {type(model).__name__} uses sliding-window attention (window "
            f"{getattr(tc, 'sliding_window', None)}), which the fused op does not implement{hint}")


def decoder_layers(model, allow_unlisted: bool = False) -> torch.nn.ModuleList:
    """The language model's decoder layers (not the vision tower's blocks)."""
    check_supported(model, allow_unlisted)
    dec = model
    if not hasattr(dec, "layers") and hasattr(model, "get_decoder"):
        dec = model.get_decoder()
    layers = getattr(dec, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not all(hasattr(l, "self_attn") for l in layers):
        raise UnsupportedArchitectureError(
            f"could not find the decoder layers of {type(model).__name__} (expected get_decoder().layers[i].self_attn)")
    return layers


def unwrap_model(module):
    """The Hugging Face model under DDP / DeepSpeed / FSDP1 / ``torch.compile`` / PEFT
    wrappers (the one whose layers get patched; FSDP2 shards in place)."""
    m = module
    for _ in range(8):
        inner = getattr(m, "_fsdp_wrapped_module", None) or getattr(m, "_orig_mod", None) or (
            m.module if isinstance(getattr(m, "module", None), torch.nn.Module) and not hasattr(m, "config")
            else None)
        if inner is None:
            break
        m = inner
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()  # PEFT
    return m


def text_config(model):
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


# --------------------------------------------------------------------------- tiny configs

def tiny_config(arch: str, *, vocab_size: int = 64, hidden_size: int = 64, num_layers: int = 2,
                num_heads: int = 4, num_kv_heads: int = 2, head_dim: int | None = None,
                vision_depth: int = 1, vision_hidden: int = 32, patch_size: int = 8,
                attn_implementation: str = "sdpa", pad_token_id: int = 0, bos_token_id: int = 1,
                eos_token_id: int = 2, vision_start_token_id: int = 3, vision_end_token_id: int = 4,
                image_token_id: int = 5, video_token_id: int = 6, initializer_range: float = 0.02):
    """A tiny random config of ``arch`` in :data:`TINY_ARCHS`: GQA by default (4 query
    heads, 2 KV heads), M-RoPE for the VL models, 2 experts of which 1 active for
    Qwen3-MoE, full attention everywhere except Gemma 3 (sliding-window layers, the last
    one full)."""
    import transformers as tf

    hd = head_dim or hidden_size // num_heads
    text = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                max_position_embeddings=1024, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                eos_token_id=eos_token_id, tie_word_embeddings=True, initializer_range=initializer_range)
    if arch in ("qwen2_5_vl", "qwen2_vl", "qwen3_vl"):
        half = hd // 2
        sec = [half - 2 * (half // 3), half // 3, half // 3]  # temporal, height, width; sums to head_dim/2
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": sec, "rope_theta": 10000.0}
        vision = dict(depth=vision_depth, num_heads=2, patch_size=patch_size, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3, initializer_range=initializer_range)
        if arch == "qwen3_vl":
            text.update(head_dim=hd)
            text["rope_parameters"]["mrope_interleaved"] = True
            vision.update(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, out_hidden_size=hidden_size,
                          num_position_embeddings=64, deepstack_visual_indexes=[0])
            cls = tf.Qwen3VLConfig
        elif arch == "qwen2_5_vl":
            vision.update(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, out_hidden_size=hidden_size,
                          window_size=4 * patch_size, fullatt_block_indexes=list(range(vision_depth)))
            cls = tf.Qwen2_5_VLConfig
        else:
            vision.update(embed_dim=vision_hidden, hidden_size=hidden_size, mlp_ratio=2)
            cls = tf.Qwen2VLConfig
        cfg = cls(text_config=text, vision_config=vision, image_token_id=image_token_id,
                  video_token_id=video_token_id, vision_start_token_id=vision_start_token_id,
                  vision_end_token_id=vision_end_token_id, tie_word_embeddings=True, initializer_range=initializer_range,
                  attn_implementation=attn_implementation)
        return cfg
    if arch == "qwen2":
        return tf.Qwen2Config(**text, attn_implementation=attn_implementation)
    if arch == "qwen3":
        return tf.Qwen3Config(**text, head_dim=hd, attn_implementation=attn_implementation)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**text, head_dim=hd, num_experts=2, num_experts_per_tok=1,
                                 moe_intermediate_size=hidden_size, attn_implementation=attn_implementation)
    if arch == "llama":
        return tf.LlamaConfig(**text, head_dim=hd, attn_implementation=attn_implementation)
    if arch == "mistral":
        return tf.MistralConfig(**text, head_dim=hd, sliding_window=None, attn_implementation=attn_implementation)
    if arch == "gemma3_text":
        types = ["sliding_attention"] * (num_layers - 1) + ["full_attention"]
        return tf.Gemma3TextConfig(**text, head_dim=hd, layer_types=types, sliding_window=8,
                                   query_pre_attn_scalar=hd, attn_implementation=attn_implementation)
    raise UnsupportedArchitectureError(f"no tiny config for {arch!r}; choose from {', '.join(TINY_ARCHS)}")


def tiny_model(arch: str, *, seed: int = 0, dtype=torch.float32, **kwargs):
    """A randomly initialised tiny model of ``arch`` (see :func:`tiny_config`)."""
    import transformers as tf

    cfg = tiny_config(arch, **kwargs)
    cls = {"qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration, "qwen2_vl": tf.Qwen2VLForConditionalGeneration,
           "qwen3_vl": tf.Qwen3VLForConditionalGeneration, "qwen2": tf.Qwen2ForCausalLM,
           "qwen3": tf.Qwen3ForCausalLM, "qwen3_moe": tf.Qwen3MoeForCausalLM, "llama": tf.LlamaForCausalLM,
           "mistral": tf.MistralForCausalLM, "gemma3_text": tf.Gemma3ForCausalLM}[arch]
    torch.manual_seed(seed)
    model = cls(cfg)
    return model.to(dtype)


def token_type_kwargs(model, input_ids: torch.Tensor) -> dict:
    """``mm_token_type_ids`` (1 on image tokens, 2 on video tokens) for VL models whose
    forward takes it (transformers >= 5.2x computes M-RoPE positions from it; older
    versions read the image tokens from ``input_ids`` and do not take the argument)."""
    cfg = model.config
    if getattr(cfg, "image_token_id", None) is None:
        return {}
    if "mm_token_type_ids" not in inspect.signature(model.forward).parameters:
        return {}
    tt = (input_ids == cfg.image_token_id).int()
    if getattr(cfg, "video_token_id", None) is not None:
        tt = tt + 2 * (input_ids == cfg.video_token_id).int()
    return {"mm_token_type_ids": tt}
