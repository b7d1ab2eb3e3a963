"""RAL inside TRL from a YAML config (TRL's config-driven workflow: ``TrlParser`` with
:class:`ral_trainer.adapters.trl.RALGRPOConfig`).

    accelerate launch examples/trl/train_ral_grpo.py --config examples/trl/ral_grpo_qwen2_5_vl.yaml

The dataset needs a prompt (a ``prompt`` column in TRL's conversational format, or a
``problem`` column, turned into one user turn with the row's image) and the reference
answer in ``solution``; the reward is 1 when the completion's last line contains it.
``tests/trainer/test_trl_yaml.py`` parses the shipped YAML and trains 2 steps with a tiny
model through :func:`main`.
"""

from __future__ import annotations

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from ral_trainer.adapters.trl import RALGRPOConfig, RALGRPOTrainer


def answer_reward(completions, solution=None, target=None, **kwargs) -> list[float]:
    """1.0 when the last line of the completion contains the reference answer, else 0."""
    gold = solution if solution is not None else target
    out = []
    for comp, ref in zip(completions, gold):
        text = comp[-1]["content"] if isinstance(comp, list) else comp
        lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
        out.append(float(bool(lines) and str(ref).strip() in lines[-1]))
    return out


def to_conversation(row: dict) -> dict:
    """``problem`` (+ ``image``) -> a one-turn conversational ``prompt``."""
    content = ([{"type": "image"}] if row.get("image") is not None else []) + [{"type": "text", "text": row["problem"]}]
    return {"prompt": [{"role": "user", "content": content}]}


def parse(argv=None):
    """``(script_args, training_args, model_args)`` from ``--config file.yaml`` and flags."""
    return TrlParser((ScriptArguments, RALGRPOConfig, ModelConfig)).parse_args_and_config(argv)


def main(script_args, training_args: RALGRPOConfig, model_args: ModelConfig, *, model=None, processing_class=None,
         train_dataset=None) -> RALGRPOTrainer:
    """Build the model, processor and dataset named in the config (or take them as
    arguments) and train."""
    if model is None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        dtype = getattr(torch, model_args.dtype) if model_args.dtype not in (None, "auto") else "auto"
        model = AutoModelForImageTextToText.from_pretrained(
            model_args.model_name_or_path, revision=model_args.model_revision, dtype=dtype,
            attn_implementation=model_args.attn_implementation)
        processing_class = processing_class or AutoProcessor.from_pretrained(model_args.model_name_or_path,
                                                                            padding_side="left")
    if train_dataset is None:
        from datasets import load_dataset

        train_dataset = load_dataset(script_args.dataset_name, script_args.dataset_config,
                                     split=script_args.dataset_train_split)
    if "prompt" not in train_dataset.column_names:
        train_dataset = train_dataset.map(to_conversation)
    trainer = RALGRPOTrainer(model=model, reward_funcs=[answer_reward], args=training_args,
                             train_dataset=train_dataset, processing_class=processing_class,
                             peft_config=get_peft_config(model_args))
    trainer.train()
    return trainer


if __name__ == "__main__":
    main(*parse())
