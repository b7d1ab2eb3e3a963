"""TRL's config-driven route: the shipped ``examples/trl/ral_grpo_qwen2_5_vl.yaml`` parses
with ``TrlParser`` into a RALGRPOConfig, and ``examples/trl/train_ral_grpo.py`` trains 2
steps from it (CPU-sized overrides on the command line, a tiny Qwen2.5-VL in place of the
7B model the YAML names, which cannot be downloaded here)."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

pytest.importorskip("trl")

from ral_trainer.adapters.toy import tiny_trl_vl_model, tiny_vl_processor, toy_vl_dataset  # noqa: E402
from ral_trainer.adapters.trl import RALGRPOConfig  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
YAML = ROOT / "examples" / "trl" / "ral_grpo_qwen2_5_vl.yaml"

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _script():
    spec = importlib.util.spec_from_file_location("train_ral_grpo", ROOT / "examples" / "trl" / "train_ral_grpo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_yaml_parses_and_trains_two_steps(tmp_path):
    mod = _script()
    cpu = ["--output_dir", str(tmp_path), "--max_steps", "2", "--use_cpu", "true", "--bf16", "false",
           "--max_completion_length", "4", "--learning_rate", "3e-3", "--save_strategy", "no"]
    script_args, args, model_args = mod.parse(["--config", str(YAML)] + cpu)
    assert isinstance(args, RALGRPOConfig)
    assert (args.ral_coef, args.attention_divergence, args.num_iterations, args.loss_type) == (1.0, "jsd", 2, "dapo")
    assert args.gradient_checkpointing and args.max_steps == 2
    assert model_args.model_name_or_path == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert script_args.dataset_name == "lmms-lab/multimodal-open-r1-8k-verified"
    proc = tiny_vl_processor()
    data = toy_vl_dataset(8).rename_column("target", "solution")
    tr = mod.main(script_args, args, model_args, model=tiny_trl_vl_model(proc), processing_class=proc,
                  train_dataset=data)
    hist = [h for h in tr.state.log_history if "ral/attention_div" in h]
    assert len(hist) == 2
    assert hist[0]["ral/attention_div"] < 1e-6 < hist[1]["ral/attention_div"]  # second step: after an update


def test_answer_reward_and_conversation():
    mod = _script()
    assert mod.answer_reward(["think\nthe answer is 42", [{"role": "assistant", "content": "7"}], ""],
                             solution=["42", "8", "1"]) == [1.0, 0.0, 0.0]
    row = mod.to_conversation({"problem": "How many?", "image": object()})
    assert row["prompt"][0]["content"][0] == {"type": "image"}
