"""A tiny, download-free TRL setup for tests and ``ral-train --trainer trl``: a word-level
tokenizer built locally, a tiny random Qwen2 model, a prompt dataset and a reward.

Task ("copy the marked word"): the prompt lists a few color words and marks one with
``*``; the reward (:func:`copy_reward`) is highest when the completion starts with the
marked word. The answer depends on where the model attends in the prompt.
"""

from __future__ import annotations

import random
from typing import Optional

WORDS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "*", "say", ":"]


def tiny_tokenizer():
    """A ``PreTrainedTokenizerFast`` over :data:`SPECIALS` + :data:`WORDS` (whitespace split)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.padding_side = "left"
    return fast


def tiny_trl_model(arch: str = "qwen2", seed: int = 0, **kwargs):
    """A tiny random decoder whose vocabulary matches :func:`tiny_tokenizer` (64 ids, the
    first ``len(SPECIALS + WORDS)`` used), with generation settings for sampling."""
    from ..models import tiny_model

    kw = dict(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
    kw.update(kwargs)
    model = tiny_model(arch, seed=seed, **kw)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    model.generation_config.bos_token_id = 1
    return model


VL_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# renders a conversation the way Qwen2.5-VL's template places an image: start, pad, end
_VL_TEMPLATE = ("{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }} {% else %}"
                "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|> <|image_pad|> <|vision_end|> "
                "{% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}{% endfor %}")


def tiny_vl_processor(image_size: int = 32):
    """A local ``Qwen2_5_VLProcessor``: the word-level tokenizer plus Qwen2.5-VL's vision
    tokens, Qwen2-VL's image processor (8-px patches, 2 x 2 merge: a ``image_size``-px
    square image is ``(image_size / 16)^2`` visual tokens) and a minimal chat template."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS + VL_SPECIALS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})
    fast.padding_side = "left"
    image_cls = getattr(tf, "Qwen2VLImageProcessorPil", tf.Qwen2VLImageProcessor)  # the PIL one needs no torchvision

    class _ImageOnlyProcessor(tf.Qwen2_5_VLProcessor):
        # Qwen2.5-VL's video processor needs torchvision; images only here.
        def check_argument_for_proper_class(self, name, arg):
            return None if arg is None else super().check_argument_for_proper_class(name, arg)

    px = image_size * image_size
    ip = image_cls(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=px, max_pixels=px)
    return _ImageOnlyProcessor(image_processor=ip, tokenizer=fast, video_processor=None, chat_template=_VL_TEMPLATE)


def tiny_trl_vl_model(processor, seed: int = 0, **kwargs):
    """A tiny random Qwen2.5-VL (real vision tower, M-RoPE) whose vocabulary and vision
    token ids match :func:`tiny_vl_processor`."""
    vocab = processor.tokenizer.get_vocab()
    kw = dict(vocab_size=len(vocab), vision_start_token_id=vocab["<|vision_start|>"],
              vision_end_token_id=vocab["<|vision_end|>"], image_token_id=vocab["<|image_pad|>"],
              video_token_id=vocab["<|video_pad|>"])
    kw.update(kwargs)
    return tiny_trl_model("qwen2_5_vl", seed=seed, **kw)


def toy_vl_dataset(n: int = 16, seed: int = 0, num_words: int = 3, image_size: int = 32):
    """Conversational prompts with one image each (``prompt``, ``image``, ``target``), the
    format TRL's GRPOTrainer feeds to a vision-language processor."""
    from datasets import Dataset
    from PIL import Image

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ws = rng.sample(WORDS, num_words)
        img = Image.new("RGB", (image_size, image_size), tuple(rng.randrange(256) for _ in range(3)))
        text = " ".join(ws) + " say :"
        rows.append({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                     "image": img, "target": ws[0]})
    return Dataset.from_list(rows)


def toy_dataset(n: int = 64, seed: int = 0, num_words: int = 4):
    """``datasets.Dataset`` with ``prompt`` and ``target`` columns."""
    from datasets import Dataset

    rng = random.Random(seed)
    prompts, targets = [], []
    for _ in range(n):
        ws = rng.sample(WORDS, num_words)
        j = rng.randrange(num_words)
        toks = [("* " + w) if i == j else w for i, w in enumerate(ws)]
        prompts.append(" ".join(toks) + " say :")
        targets.append(ws[j])
    return Dataset.from_dict({"prompt": prompts, "target": targets})


def copy_reward(completions, target, **kwargs) -> list[float]:
    """1 if the completion (decoded by TRL, special tokens skipped) starts with the marked
    word, 0.3 if the word appears later, 0.1 for any color word first, else 0."""
    out = []
    for comp, tgt in zip(completions, target):
        if isinstance(comp, list):  # conversational prompts: [{"role": "assistant", "content": ...}]
            comp = comp[0]["content"]
        words = comp.split()
        if words and words[0] == tgt:
            out.append(1.0)
        elif tgt in words:
            out.append(0.3)
        else:
            out.append(0.1 if words and words[0] in WORDS else 0.0)
    return out


def quick_config(output_dir: str, *, max_steps: int = 8, ral_coef: float = 1.0, num_iterations: int = 2,
                 seed: int = 0, **overrides):
    """A CPU-sized :class:`RALGRPOConfig` (fp32, no logging integrations)."""
    from .trl import RALGRPOConfig

    kw = dict(output_dir=output_dir, per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
              num_iterations=num_iterations, gradient_accumulation_steps=1, max_steps=max_steps, learning_rate=3e-3,
              logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False, fp16=False,
              ral_coef=ral_coef, temperature=1.0, seed=seed, data_seed=seed, beta=0.0,
              dataloader_num_workers=0, disable_tqdm=True)
    kw.update(overrides)
    return RALGRPOConfig(**kw)


def run_trl_demo(out_dir: str, *, quick: bool = True, seed: int = 0, ral_coef: float = 1.0,
                 max_steps: Optional[int] = None) -> dict:
    """Train the tiny model with :class:`RALGRPOTrainer` on the toy task; returns
    ``{"history": TRL's log history, "attention_loss": [...], "reward": [...]}``."""
    import json
    import os

    from .trl import RALGRPOTrainer

    steps = max_steps or (12 if quick else 60)
    os.makedirs(out_dir, exist_ok=True)
    tok = tiny_tokenizer()
    model = tiny_trl_model(seed=seed)
    args = quick_config(out_dir, max_steps=steps, ral_coef=ral_coef, seed=seed)
    trainer = RALGRPOTrainer(model=model, reward_funcs=copy_reward, args=args, train_dataset=toy_dataset(64, seed),
                             processing_class=tok)
    trainer.train()
    hist = [h for h in trainer.state.log_history if "ral/attention_loss" in h]
    res = {"history": trainer.state.log_history,
           "attention_loss": [h["ral/attention_loss"] for h in hist],
           "attention_div": [h.get("ral/attention_div") for h in hist],
           "reward": [h.get("reward") for h in hist]}
    with open(os.path.join(out_dir, "trl_metrics.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res
