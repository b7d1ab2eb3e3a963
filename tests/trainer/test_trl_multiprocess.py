"""RALGRPOTrainer inside TRL's own multi-process loop: 2 CPU processes (gloo), launched the
way ``accelerate launch`` does (RANK / WORLD_SIZE / MASTER_* in the environment), so
accelerate wraps the patched model in DDP. Each rank generates its own completions, so the
check is DDP's contract, not equality with one process: after every optimizer step both
ranks hold the same weights, the attention term is non-zero and every logged value is
finite."""

from __future__ import annotations

import json
import os

import pytest
import torch

from trainer_helpers import assert_trl_ranks_in_sync, spawn_ranks

pytest.importorskip("trl")
pytest.importorskip("datasets")

WORLD = 2


def _worker(rank: int, port: int, out: str):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ACCELERATE_USE_CPU="true")
    torch.set_num_threads(1)
    import warnings

    from transformers import TrainerCallback

    from ral_trainer.adapters.toy import copy_reward, quick_config, tiny_tokenizer, tiny_trl_model, toy_dataset
    from ral_trainer.adapters.trl import RALGRPOTrainer

    warnings.simplefilter("ignore")
    sums = []

    class WeightSums(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            sums.append(sum(float(p.detach().double().sum()) for p in model.parameters()))

    torch.manual_seed(0)
    args = quick_config(os.path.join(out, "run"), max_steps=3, per_device_train_batch_size=4, ddp_backend="gloo")
    trainer = RALGRPOTrainer(model=tiny_trl_model(), reward_funcs=copy_reward, args=args,
                             train_dataset=toy_dataset(32), processing_class=tiny_tokenizer(),
                             callbacks=[WeightSums()])
    trainer.train()
    wrapped = type(trainer.model_wrapped).__name__
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(dict(sums=sums, history=trainer.state.log_history, wrapped=wrapped,
                       world=trainer.accelerator.num_processes), f)


def test_two_processes_stay_in_sync(tmp_path):
    ranks = spawn_ranks(_worker, WORLD, tmp_path)
    assert all(r["world"] == WORLD for r in ranks)
    assert ranks[0]["wrapped"] == "DistributedDataParallel"
    assert_trl_ranks_in_sync(ranks, steps=3)
