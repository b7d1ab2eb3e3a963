"""RALGRPOTrainer under DeepSpeed ZeRO-3 through accelerate: 2 CPU processes (gloo, the
DeepSpeed CPU accelerator), launched the way ``accelerate launch`` does (RANK / WORLD_SIZE /
MASTER_* in the environment) with a ZeRO-3 config passed as ``deepspeed=`` to the trainer
args. Checks: the model is wrapped in a ``DeepSpeedEngine``, its parameters are ZeRO-3
partitioned (``ds_status`` / ``ds_numel``, each rank holding only a shard), 3 optimizer steps
run with finite logged values and a non-zero attention term, and after every step both ranks
gather the same full weights. No compiled DeepSpeed op is needed: the optimizer is left
unset, so the HF Trainer's torch AdamW runs on the ZeRO-3 partitions."""

from __future__ import annotations

import json
import os

import pytest
import torch

from trainer_helpers import assert_trl_ranks_in_sync, spawn_ranks

pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("deepspeed", reason="deepspeed is not installed")

WORLD = 2

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,  # partition every parameter, even tiny ones
        "stage3_gather_16bit_weights_on_model_save": False,
    },
    "zero_force_ds_cpu_optimizer": False,
    "bf16": {"enabled": False},
    "fp16": {"enabled": False},
}


def _worker(rank: int, port: int, out: str):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    os.environ.pop("ACCELERATE_USE_CPU", None)
    # What ``accelerate launch --use_deepspeed`` sets. accelerate's DeepSpeed path only takes the
    # world size from torch.distributed when a backend is named, and transformers does not pass
    # ``ddp_backend`` on when ``deepspeed=`` is set: without a GPU the process group would be
    # built with world 2 while accelerate counted 1 process. So the state is configured here
    # (gloo, via deepspeed.init_distributed) and the trainer reuses it (``use_configured_state``).
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    torch.set_num_threads(1)
    import warnings

    import deepspeed
    from transformers import TrainerCallback

    from ral_trainer.adapters.toy import copy_reward, quick_config, tiny_tokenizer, tiny_trl_model, toy_dataset
    from ral_trainer.adapters.trl import RALGRPOTrainer

    warnings.simplefilter("ignore")
    sums, part = [], {}

    def gathered_sum(model):
        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return sum(float(p.detach().double().sum()) for p in params)

    class WeightSums(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            params = list(model.parameters())
            if not part:
                part.update(all_ds=all(hasattr(p, "ds_status") and hasattr(p, "ds_numel") for p in params),
                            ds_numel=sum(p.ds_numel for p in params),
                            local_numel=sum(p.ds_tensor.numel() for p in params),
                            shapes_empty=all(p.numel() == 0 for p in params))
            sums.append(gathered_sum(model))

    from accelerate import PartialState

    state = PartialState(backend="gloo")
    assert state.num_processes == WORLD and state.device.type == "cpu", (state.num_processes, state.device)
    torch.manual_seed(0)
    args = quick_config(os.path.join(out, "run"), max_steps=3, per_device_train_batch_size=4, ddp_backend="gloo",
                        use_cpu=False, deepspeed=DS_CONFIG,
                        accelerator_config={"use_configured_state": True})
    trainer = RALGRPOTrainer(model=tiny_trl_model(), reward_funcs=copy_reward, args=args,
                             train_dataset=toy_dataset(32), processing_class=tiny_tokenizer(),
                             callbacks=[WeightSums()])
    trainer.train()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(dict(sums=sums, history=trainer.state.log_history, part=part,
                       wrapped=type(trainer.model_wrapped).__name__,
                       zero_stage=trainer.accelerator.state.deepspeed_plugin.zero_stage,
                       world=trainer.accelerator.num_processes), f)


def test_zero3_two_processes(tmp_path):
    ranks = spawn_ranks(_worker, WORLD, tmp_path)
    assert all(r["world"] == WORLD for r in ranks)
    assert all(r["wrapped"] == "DeepSpeedEngine" and r["zero_stage"] == 3 for r in ranks), ranks[0]["wrapped"]
    for r in ranks:  # ZeRO-3 partitioning: every param has ds_* metadata, each rank holds only its shard
        p = r["part"]
        assert p["all_ds"] and p["shapes_empty"], p
        assert p["local_numel"] * WORLD >= p["ds_numel"] > p["local_numel"], p
    assert ranks[0]["part"]["ds_numel"] == ranks[1]["part"]["ds_numel"]
    assert_trl_ranks_in_sync(ranks, steps=3)
    assert ranks[0]["sums"][0] != ranks[0]["sums"][-1]  # the weights actually moved
