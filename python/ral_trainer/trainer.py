"""A thin GRPO + RAL training loop (SPEC section 1) around a patched Hugging Face model.

One rollout step:

1. sample ``prompts_per_step`` problems from the task, ``num_generations`` (G) completions
   each with ``model.generate`` (patched layers run their own implementation here);
2. rewards from the task's reward function, group-normalized advantages;
3. one no-grad pass that computes old log-probs **and** captures the old policy's
   attention cache (``patch.capture``) — the pass GRPO runs anyway;
4. ``num_iterations`` epochs over ``num_minibatches`` shuffled minibatches, each one
   optimizer step (with ``grad_accum`` micro-batches): clipped GRPO loss
   (+ ``beta`` KL to a reference model) + ``ral_coef`` · RAL term from the fused op.

The attention policy of a response token is the attention row of the query that
produced it, i.e. of the position just before it: for a prompt of length P and a
completion of R tokens those are rows ``P-1 .. P+R-2``.

With ``num_iterations * num_minibatches == 1`` every update happens at θ = θ_old, where
the RAL divergence and its gradient are identically zero; the trainer warns about it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from typing import Callable, Optional

import torch

from . import losses
from .guard import ZeroAttentionTermWarning, ZeroTermGuard, warn_zero_schedule
from .models import token_type_kwargs
from .patch import OldPolicy, patch_model

__all__ = ["TrainConfig", "RALTrainer", "ZeroAttentionTermWarning"]


@dataclasses.dataclass
class TrainConfig:
    ral_coef: float = 1.0  # lambda; 0 = plain GRPO
    divergence: str = "jsd"  # "jsd" | "kl" | "reverse_kl"
    beta: float = 0.0  # KL to the reference model
    loss_type: str = "grpo"  # TRL: grpo | bnpo | dr_grpo | dapo (verl names work too)
    num_generations: int = 8  # G
    prompts_per_step: int = 8
    num_iterations: int = 2  # epochs over each rollout batch
    num_minibatches: int = 2  # optimizer steps per epoch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    temperature: float = 1.0
    max_completion_length: int = 4
    adv_scale: str = "group"
    dtype: str = "float32"  # "float32" | "bfloat16"
    seed: int = 0
    layers: Optional[list] = None  # patched decoder layers (default: last)
    backend: str = "auto"
    offload_cache: Optional[str] = None  # "cpu": keep the old-policy cache in host memory between passes
    log_attention: bool = True
    # on-policy distillation (with a teacher): + mu * token KD + gamma * attention divergence
    distill_mu: float = 1.0
    distill_gamma: float = 1.0
    distill_kd: str = "reverse_kl"
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 0
    progress: bool = True

    def optimizer_steps_per_batch(self) -> int:
        return self.num_iterations * self.num_minibatches


def _merge_extras(extras: list[dict], device) -> dict:
    if not extras or not extras[0]:
        return {}
    return {k: torch.cat([e[k] for e in extras]).to(device) for k in extras[0]}


class RALTrainer:
    """GRPO / RAL / RAL-zero on a task object (see :mod:`ral_trainer.visual_search` for
    the interface: ``sample``, ``model_extras``, ``reward``, ``correct``,
    ``answer_index``, ``target_positions``).

    Args:
        model: a supported Hugging Face causal LM or VLM (patched here).
        task: the problem source and reward.
        config: :class:`TrainConfig`.
        ref_model: reference model for ``beta > 0``.
        teacher: optional teacher for on-policy distillation (same tokenizer; any head
            count / head dim): run on the student's samples, adds ``distill_mu`` · token
            KD + ``distill_gamma`` · attention divergence (weight 1) to the loss.
        reward_fn: optional override ``(completions, problems) -> list[float]``.
        pad_token_id, eos_token_id: for generation (default from the model config).
    """

    def __init__(self, model, task, config: TrainConfig, *, ref_model=None, teacher=None,
                 reward_fn: Optional[Callable] = None, pad_token_id: Optional[int] = None,
                 eos_token_id: Optional[int] = None, device: str | torch.device = "cpu"):
        self.cfg = config
        self.device = torch.device(device)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]
        self.model = model.to(self.device, dtype)
        self.task = task
        self.ref_model = ref_model.to(self.device, dtype).eval() if ref_model is not None else None
        self.teacher = teacher.to(self.device, dtype).eval() if teacher is not None else None
        self.teacher_patch = patch_model(self.teacher, backend=config.backend) if teacher is not None else None
        if config.beta and ref_model is None:
            raise ValueError("beta > 0 needs a ref_model")
        self.reward_fn = reward_fn or task.reward
        tc = getattr(model.config, "text_config", None) or model.config
        self.pad_id = pad_token_id if pad_token_id is not None else tc.pad_token_id
        self.eos_id = eos_token_id if eos_token_id is not None else tc.eos_token_id
        # never sample placeholders the model would try to fill with image features
        special = [getattr(model.config, n, None) for n in ("image_token_id", "video_token_id",
                                                             "vision_start_token_id", "vision_end_token_id")]
        self.suppress = sorted({t for t in special + [self.pad_id] if t is not None and t != self.eos_id})
        n = config.prompts_per_step * config.num_generations
        if n % (config.num_minibatches * config.grad_accum):
            raise ValueError(f"prompts_per_step * num_generations = {n} must be divisible by "
                             f"num_minibatches * grad_accum = {config.num_minibatches * config.grad_accum}")
        if config.ral_coef and config.optimizer_steps_per_batch() == 1 and teacher is None:
            warn_zero_schedule("num_iterations * num_minibatches == 1 (one optimizer step per rollout batch)",
                               "Use num_iterations > 1 or num_minibatches > 1.")
        self.zero_guard = ZeroTermGuard(where="RALTrainer")
        self.patch = patch_model(self.model, config.layers, backend=config.backend)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0
        self.history: list[dict] = []
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.data_gen = torch.Generator().manual_seed(config.seed + 1)

    # ------------------------------------------------------------------ batches
    def _prompt_batch(self, problems: list[dict]):
        ids = [torch.as_tensor(p["input_ids"]) for p in problems]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros(len(ids), width, dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, width - len(x):] = x
            attn[i, width - len(x):] = 1
        extras = [self.task.model_extras(p) for p in problems]
        return input_ids.to(self.device), attn.to(self.device), extras

    def _completion_mask(self, comp: torch.Tensor) -> torch.Tensor:
        is_eos = comp == self.eos_id
        first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(comp[:, 0], comp.shape[1]))
        return torch.arange(comp.shape[1], device=comp.device)[None] <= first[:, None]

    @torch.no_grad()
    def generate(self, problems: list[dict], *, greedy: bool = False) -> dict:
        """Sample one completion per problem; returns the rollout dict (token tensors, masks)."""
        self.model.eval()
        input_ids, attn, extras = self._prompt_batch(problems)
        R = self.cfg.max_completion_length
        gen = self.model.generate(input_ids=input_ids, attention_mask=attn, **_merge_extras(extras, self.device),
                                  **token_type_kwargs(self.model, input_ids),
                                  max_new_tokens=R, do_sample=not greedy, temperature=self.cfg.temperature if not greedy else None,
                                  top_k=0 if not greedy else None, top_p=1.0 if not greedy else None,
                                  pad_token_id=self.pad_id, eos_token_id=self.eos_id,
                                  suppress_tokens=self.suppress or None)
        comp = gen[:, input_ids.shape[1]:]
        if comp.shape[1] < R:
            comp = torch.cat([comp, comp.new_full((comp.shape[0], R - comp.shape[1]), self.pad_id)], 1)
        cmask = self._completion_mask(comp)
        comp = torch.where(cmask, comp, torch.full_like(comp, self.pad_id))
        return {"prompt_ids": input_ids, "prompt_mask": attn, "extras": extras, "completion_ids": comp,
                "completion_mask": cmask, "problems": problems}

    def _inputs(self, roll: dict, idx: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Model kwargs of the full sequences ``idx``, the policy-row mask ``[b, T]`` (row
        t-1 for completion token t), the completion ids and mask ``[b, R]``."""
        il = idx.tolist()
        p, pm = roll["prompt_ids"][idx], roll["prompt_mask"][idx]
        c, cm = roll["completion_ids"][idx], roll["completion_mask"][idx]
        ids = torch.cat([p, c], 1)
        attn = torch.cat([pm, cm.long()], 1)
        rows = torch.zeros_like(attn, dtype=torch.bool)
        rows[:, p.shape[1] - 1: ids.shape[1] - 1] = cm
        kw = {"input_ids": ids, "attention_mask": attn, **_merge_extras([roll["extras"][i] for i in il], self.device),
              **token_type_kwargs(self.model, ids)}
        return kw, rows, c, cm

    def _logits(self, model, kw, r):
        return model(**kw, logits_to_keep=r + 1, use_cache=False).logits

    # ------------------------------------------------------------------ one rollout step
    def train_step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        G, R = cfg.num_generations, cfg.max_completion_length
        base = self.task.sample(cfg.prompts_per_step, self.data_gen)
        problems = [p for p in base for _ in range(G)]
        roll = self.generate(problems)
        comps = [c[m].tolist() for c, m in zip(roll["completion_ids"], roll["completion_mask"])]
        rewards = torch.tensor(self.reward_fn(comps, problems), dtype=torch.float32)
        correct = torch.tensor([float(self.task.correct(c, p)) for c, p in zip(comps, problems)])
        adv = losses.group_advantages(rewards, G, scale=cfg.adv_scale).to(self.device)
        N = len(problems)
        mb = N // cfg.num_minibatches
        micro = mb // cfg.grad_accum

        # old policy: log-probs + attention cache, one no-grad pass (chunked like the minibatches)
        old_logp, ref_logp, parts, rows_att, t_logits, t_parts = [], [], [], [], [], []
        with torch.no_grad():
            for s in range(0, N, mb):
                idx = torch.arange(s, min(s + mb, N))
                kw, rows, c, cm = self._inputs(roll, idx)
                with self.patch.capture(num_rows=R + 1, record_attention=cfg.log_attention,
                                        offload=cfg.offload_cache) as cap:
                    lg = self._logits(self.model, kw, R)
                old_logp.append(losses.token_logprobs(lg, c, cfg.temperature))
                parts.append(cap.old_policy)
                if cfg.log_attention:
                    rows_att.append(cap.attention_rows[max(cap.attention_rows)])
                if self.ref_model is not None:
                    ref_logp.append(losses.token_logprobs(self._logits(self.ref_model, kw, R), c, cfg.temperature))
                if self.teacher is not None:
                    with self.teacher_patch.capture(num_rows=R + 1) as tcap:
                        t_logits.append(self._logits(self.teacher, kw, R)[:, :-1].float())
                    t_parts.append(tcap.old_policy)
        old_logp = torch.cat(old_logp)
        ref_logp = torch.cat(ref_logp) if ref_logp else None
        old = OldPolicy.cat(parts)
        teach = OldPolicy.cat(t_parts) if t_parts else None
        t_logits = torch.cat(t_logits) if t_logits else None
        att_stats = self._attention_stats(torch.cat(rows_att), roll, comps) if rows_att else {}

        # updates
        self.model.train()
        tok_losses, ral_terms, divs, stats = [], [], [], {}
        kd_terms, tdivs = [], []
        opt_steps = 0  # optimizer steps taken on this rollout batch so far
        signal = bool((adv != 0).any())  # without it the weights need not move
        for _ in range(cfg.num_iterations):
            perm = torch.randperm(N)
            for s in range(0, N, mb):
                mb_idx = perm[s:s + mb]
                n_items = float(roll["completion_mask"][mb_idx].sum().clamp(min=1))
                for a in range(0, mb, micro):
                    idx = mb_idx[a:a + micro]
                    kw, rows, c, cm = self._inputs(roll, idx)
                    with self.patch.update(old.select(idx), rows, divergence=cfg.divergence,
                                           teacher=None if teach is None else teach.select(idx)) as upd:
                        lg = self._logits(self.model, kw, R)
                    logp = losses.token_logprobs(lg, c, cfg.temperature)
                    lt = dict(loss_type=cfg.loss_type, max_completion_length=R,
                              num_items_in_batch=n_items if cfg.loss_type in ("dapo", "token-mean") else None)
                    pg, st = losses.grpo_loss(logp, old_logp[idx], adv[idx], cm, epsilon_low=cfg.epsilon,
                                              epsilon_high=cfg.epsilon_high, beta=cfg.beta,
                                              ref_logp=None if ref_logp is None else ref_logp[idx], **lt)
                    div = upd.divergence[:, -R - 1:-1]
                    if cfg.ral_coef:
                        self.zero_guard.observe(div, cm, moved=opt_steps > 0 and signal)
                    ral = losses.ral_term(div, adv[idx], cm, **lt)
                    loss = pg + cfg.ral_coef * ral
                    if teach is not None:
                        dl, dst = losses.distillation_loss(
                            lg[:, :-1], t_logits[idx.to(t_logits.device)], upd.teacher_divergence[:, -R - 1:-1], cm,
                            mu=cfg.distill_mu, gamma=cfg.distill_gamma, kd=cfg.distill_kd, loss_type=cfg.loss_type)
                        loss = loss + dl
                        kd_terms.append(dst["token_kd"])
                        tdivs.append(dst["attn_div"])
                    scale = 1.0 if cfg.loss_type in ("dapo", "token-mean") else 1.0 / cfg.grad_accum
                    (loss * scale).backward()
                    tok_losses.append(float(pg.detach()))
                    ral_terms.append(float(ral.detach()))
                    divs.append(float((div.detach() * cm).sum() / cm.sum().clamp(min=1)))
                    for k, v in st.items():
                        stats.setdefault(k, []).append(v)
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                opt_steps += 1
        self.step += 1
        rec = {"step": self.step, "reward": float(rewards.mean()), "accuracy": float(correct.mean()),
               "token_loss": sum(tok_losses) / len(tok_losses), "ral_term": sum(ral_terms) / len(ral_terms),
               "attn_divergence": sum(divs) / len(divs),
               "completion_len": float(roll["completion_mask"].float().sum(1).mean()),
               "cache_mib": old.nbytes() / 2 ** 20, "time_s": time.perf_counter() - t0,
               **{k: sum(v) / len(v) for k, v in stats.items()}, **att_stats}
        if kd_terms:
            rec["token_kd"] = sum(kd_terms) / len(kd_terms)
            rec["teacher_attn_divergence"] = sum(tdivs) / len(tdivs)
        self.history.append(rec)
        return rec

    def _attention_stats(self, rows: torch.Tensor, roll: dict, comps: list) -> dict:
        """Attention entropy (mean over response rows) and the answer row's mass on the
        target region, from the no-grad capture pass (rows ``[N, R+1, T]``)."""
        cm = roll["completion_mask"].cpu()
        rows = rows.cpu()[:, :-1]  # row i produced completion token i
        ent = -(rows * rows.clamp_min(1e-30).log()).sum(-1)
        ent = float((ent * cm).sum() / cm.sum().clamp(min=1))
        width = roll["prompt_ids"].shape[1]
        mass = []
        for i, (c, prob) in enumerate(zip(comps, roll["problems"])):
            a = self.task.answer_index(c)
            a = 0 if a is None else a
            pad = int((roll["prompt_mask"][i] == 0).sum())
            tp = self.task.target_positions(prob, width, pad)
            mass.append(float(rows[i, a, tp].sum()))
        return {"attn_entropy": ent, "attn_target_mass": sum(mass) / len(mass)}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, problems: list[dict]) -> dict:
        """Greedy accuracy and the answer row's attention over the image (per problem)."""
        roll = self.generate(problems, greedy=True)
        comps = [c[m].tolist() for c, m in zip(roll["completion_ids"], roll["completion_mask"])]
        acc = sum(self.task.correct(c, p) for c, p in zip(comps, problems)) / len(problems)
        R = self.cfg.max_completion_length
        kw, rows, c, cm = self._inputs(roll, torch.arange(len(problems)))
        with self.patch.capture(num_rows=R + 1, record_attention=True) as cap:
            self._logits(self.model, kw, R)
        att = cap.attention_rows[max(cap.attention_rows)].cpu()
        width = roll["prompt_ids"].shape[1]
        maps, mass = [], []
        for i, (cc, prob) in enumerate(zip(comps, problems)):
            a = self.task.answer_index(cc)
            a = 0 if a is None else a
            pad = int((roll["prompt_mask"][i] == 0).sum())
            img = att[i, a, self.task.image_positions(pad)]
            maps.append(img)
            mass.append(float(att[i, a, self.task.target_positions(prob, width, pad)].sum()))
        self.model.train()
        return {"accuracy": acc, "attn_target_mass": sum(mass) / len(mass), "image_attention": torch.stack(maps)}

    # ------------------------------------------------------------------ loop + checkpoints
    def train(self, num_steps: int, *, eval_problems: Optional[list] = None, eval_every: int = 0,
              callback: Optional[Callable] = None) -> list[dict]:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=self.step, disable=not self.cfg.progress, desc="ral-train",
                   dynamic_ncols=True, leave=False)
        while self.step < num_steps:
            rec = self.train_step()
            if eval_problems is not None and eval_every and self.step % eval_every == 0:
                ev = self.evaluate(eval_problems)
                rec["eval_accuracy"] = ev["accuracy"]
                rec["eval_attn_target_mass"] = ev["attn_target_mass"]
            bar.update(1)
            bar.set_postfix(reward=f"{rec['reward']:.2f}", div=f"{rec['attn_divergence']:.1e}",
                            mass=f"{rec.get('attn_target_mass', float('nan')):.2f}")
            if callback is not None:
                callback(rec)
            if self.cfg.checkpoint_dir and self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.save_checkpoint(os.path.join(self.cfg.checkpoint_dir, f"step-{self.step}"))
        bar.close()
        return self.history

    def save_checkpoint(self, path: str) -> None:
        """Weights, optimizer, every RNG (torch, CUDA, Python, the task's data stream),
        step and metric history: :meth:`load_checkpoint` continues bit-for-bit (on CPU)."""
        os.makedirs(path, exist_ok=True)
        state = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
            "history": self.history, "rng_torch": torch.get_rng_state(), "rng_python": random.getstate(),
            "rng_data": self.data_gen.get_state(), "config": dataclasses.asdict(self.cfg),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        tmp = os.path.join(path, "trainer.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, os.path.join(path, "trainer.pt"))
        with open(os.path.join(path, "metrics.json"), "w") as f:
            json.dump(self.history, f)

    def load_checkpoint(self, path: str) -> None:
        state = torch.load(os.path.join(path, "trainer.pt"), map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.history = list(state["history"])
        torch.set_rng_state(state["rng_torch"].cpu())
        random.setstate(state["rng_python"])
        self.data_gen.set_state(state["rng_data"].cpu())
        if state.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
