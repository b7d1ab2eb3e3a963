"""verl on Ray, configured from Hydra alone: the shipped example config composes on top of
verl's own defaults, and its Ray ``worker_process_setup_hook`` reaches a Ray actor that,
like verl's TaskRunner, imports ``ActorRolloutRefWorker`` in its own process: there the
class attaches the adapter in ``init_model``, while the driver's class is untouched (a
driver-side patch never reaches the actors). Local Ray, 2 CPUs; runs in the verl
environment (``test_verl_env.py``)."""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

pytest.importorskip("verl", reason="runs in the verl environment built by tests/trainer/test_verl_env.py")
ray = pytest.importorskip("ray")

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "verl"


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(EXAMPLE), version_base=None):
        return compose(config_name="ral_grpo_qwen2_5_vl", overrides=list(overrides))


def test_example_config_composes_on_verl_defaults():
    from verl.utils.config import omega_conf_to_dataclass

    from ral_trainer.adapters.verl import RALVerlConfig

    cfg = _compose("actor_rollout_ref.ral.ral_coef=0.5")
    assert cfg.ray_kwargs.ray_init.runtime_env.worker_process_setup_hook == "ral_trainer.adapters.verl.ray_setup_hook"
    ral = RALVerlConfig(**cfg.actor_rollout_ref.ral)
    assert ral.ral_coef == 0.5 and ral.attention_divergence == "jsd"
    assert cfg.actor_rollout_ref.model.use_remove_padding
    assert cfg.trainer.use_v1  # verl's default trainer, no deprecated switch needed
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)  # verl's own parse of the actor block
    assert actor.ppo_mini_batch_size == 32 and cfg.data.train_batch_size == 128  # 4 optimizer steps per rollout


class _TaskRunnerLike:
    """Like verl's TaskRunner: a Ray actor that imports the worker class in its process."""

    def probe(self):
        from verl.workers.engine_workers import ActorRolloutRefWorker

        return os.getpid(), bool(getattr(ActorRolloutRefWorker.init_model, "_ral_hooked", False))


def test_setup_hook_reaches_ray_actors():
    from omegaconf import OmegaConf
    from verl.workers.engine_workers import ActorRolloutRefWorker

    cfg = _compose()
    runtime_env = OmegaConf.to_container(cfg.ray_kwargs.ray_init.runtime_env)
    here = [str(ROOT), str(ROOT / "python")]
    runtime_env["env_vars"] = {"PYTHONPATH": os.pathsep.join(here + [p for p in sys.path if p])}
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=runtime_env, log_to_driver=False)
    try:
        runners = [ray.remote(num_cpus=1)(_TaskRunnerLike).remote() for _ in range(2)]
        got = ray.get([r.probe.remote() for r in runners], timeout=300)
    finally:
        ray.shutdown()
    assert len({pid for pid, _ in got}) == 2 and all(pid != os.getpid() for pid, _ in got)
    assert all(hooked for _, hooked in got)
    assert not getattr(ActorRolloutRefWorker.init_model, "_ral_hooked", False)  # the driver was never patched
