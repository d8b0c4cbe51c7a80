"""The mutants ``tests/mutation/run.py`` plants: each a small, plausible bug in one concept, written as exact
text edits of the source at HEAD, with the integration files that cover that concept (run after the unit and
controller tiers). An edit whose text no longer occurs exactly once stops the run with a message to update it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Edit:
    file: str
    old: str
    new: str


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    edits: tuple[Edit, ...]
    integration: tuple[str, ...] = ()  # the integration files that cover it
    first: tuple[str, ...] = ()  # tests of its concept, run first (only the order: see outcomes.py)


ENGINE, GEN = "elastic/runtime/engine.py", "elastic/model/generate.py"
EQUIV, CHAOS = "tests/integration/test_equivalence.py", "tests/integration/test_chaos.py"
GRPO, PROMPTS = "tests/integration/test_grpo_elastic.py", "tests/integration/test_grpo_prompts.py"
LORA = "tests/integration/test_lora_equivalence.py"
ENGINE_REF, SAMPLING = "tests/unit/test_engine_reference.py", "tests/unit/test_sampling.py"

MUTANTS = (
    # ---- the engine's training step -----------------------------------------------------------------------
    Mutant("cursor", "the data cursor is one step ahead",
           (Edit(ENGINE, "mine = self.sampler.slice_indices(step, ", "mine = self.sampler.slice_indices(step + 1, "),),
           (EQUIV,),
           first=(ENGINE_REF,)),
    Mutant("adam-bias-correction", "AdamW's bias correction is one step ahead",
           (Edit(ENGINE, 'entry = {"step": torch.tensor(float(self.step), ',
                 'entry = {"step": torch.tensor(float(self.step + 1), '),), (EQUIV,),
           first=(ENGINE_REF,)),
    Mutant("local-normaliser", "each rank divides its loss by its own token count, not the global batch's",
           (Edit(ENGINE, "self._n_targets = n_targets = self.global_targets(step)",
                 "self._n_targets = n_targets = max(1, int((self.dataset.batch(self.sampler.slice_indices(step, "
                 "layout.data_index(self.rank), layout.data_parallel))[1] != -100).sum()))"),), (EQUIV,),
           first=(ENGINE_REF, EQUIV)),
    Mutant("lr-shift", "the learning-rate schedule runs one step ahead",
           (Edit("elastic/runtime/optim.py", "    if cfg.warmup_steps and step < cfg.warmup_steps:",
                 "    step += 1\n    if cfg.warmup_steps and step < cfg.warmup_steps:"),), (EQUIV,),
           first=(ENGINE_REF,)),
    # ---- moving state: reshards, checkpoints, snapshots, tensor-parallel boxes --------------------------------
    Mutant("reshard-skips-a-tensor", "a reshard does not move the final norm's weight",
           (Edit("elastic/runtime/transfer.py", "    for rnd, tag, t in work:\n",
                 "    for rnd, tag, t in work:\n        if t.tensor == 'model.norm.weight':\n            continue\n"),),
           ("tests/integration/test_reshard_live.py",),
           first=("tests/unit/test_plan.py", "tests/integration/test_reshard_live.py")),
    Mutant("tp-bias-shard", "a tensor-parallel bias's shard is cut from one element too many (off by one)",
           (Edit("elastic/core/layout.py", "lo, hi = chunk(n, layout.tp, c.tp)",
                 "lo, hi = chunk(n + (len(spec.shape) == 1), layout.tp, c.tp)"),),
           ("tests/integration/test_families_train.py",),
           first=("tests/unit/test_layout.py", "tests/unit/test_plan.py")),
    Mutant("checkpoint-no-exp-avg-sq", "a checkpoint leaves out AdamW's exp_avg_sq",
           (Edit("elastic/core/checkpoint.py", "    for spec in specs:\n        seen: set[Box] = set()",
                 "    for spec in (s for s in specs if not s.name.endswith('::exp_avg_sq')):\n"
                 "        seen: set[Box] = set()"),), ("tests/integration/test_checkpoint_resume.py",),
           first=("tests/unit/test_checkpoint.py",)),
    Mutant("snapshot-step-before", "a snapshot of step s is restored as step s - 1 (its step replayed on top)",
           (Edit("elastic/runtime/restore.py", "return tensors, self.step", "return tensors, self.step - 1"),
            Edit("elastic/driver/ray_group.py", "self._placement, self._committed = new, snap.step",
                 "self._placement, self._committed = new, snap.step - 1")), (GRPO, CHAOS),
           first=(GRPO,)),
    # ---- the controller -----------------------------------------------------------------------------------
    Mutant("history-keeps-replays", "a replayed step is kept in the history beside its first try",
           (Edit("elastic/control/steps.py",
                 "while self.history and self.history[-1].step >= summary.step:",
                 "while False:"),), (CHAOS,),
           first=("tests/controller",)),
    Mutant("commit-loss-lost", "a worker lost after every rank computed a step (the commit) loses that step",
           (Edit("elastic/control/handlers.py", "if failure.step_results is not None:", "if False:"),), (CHAOS,),
           first=("tests/controller",)),
    # ---- LoRA ---------------------------------------------------------------------------------------------
    Mutant("lora-scaling", "LoRA scales by alpha / sqrt(r) instead of alpha / r",
           (Edit("elastic/model/lora.py", "self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r",
                 "self.scaling = alpha / r if use_rslora else alpha / math.sqrt(r)"),), (LORA,),
           first=("tests/unit/test_lora.py", ENGINE_REF)),
    Mutant("lora-dropout-local-row", "LoRA dropout masks are seeded by the local row, not the global sample",
           (Edit("elastic/model/lora.py", "            for sample in self.samples])",
                 "            for sample in range(len(self.samples))])"),), (LORA,),
           first=("tests/unit/test_lora.py", ENGINE_REF)),
    # ---- GRPO and sampling --------------------------------------------------------------------------------
    Mutant("grpo-bessel", "GRPO's reward std without Bessel's correction",
           (Edit("elastic/recipes/grpo/advantage.py",
                 "variance = ((values - mean) ** 2).nanmean(dim=dim) * count / (count - 1).clamp(min=1)",
                 "variance = ((values - mean) ** 2).nanmean(dim=dim)"),), (GRPO,),
           first=("tests/unit/test_grpo_math.py",)),
    Mutant("top-p-order", "top-p filters the T = 1 distribution, before the temperature",
           (Edit(GEN, "probs = _filter_top_p(torch.softmax(logits.double() / cfg.temperature, -1), cfg.top_p)",
                 "probs = torch.softmax(torch.log(_filter_top_p(torch.softmax(logits.double(), -1), cfg.top_p))"
                 " / cfg.temperature, -1)"),), (GRPO,),
           first=(SAMPLING,)),
    Mutant("stop-not-counted", "a completion's length leaves out its stop token",
           (Edit(GEN, "lengths = torch.where(hit, torch.full_like(lengths, t + 1), lengths)",
                 "lengths = torch.where(hit, torch.full_like(lengths, t), lengths)"),), (PROMPTS,),
           first=(SAMPLING,)),
    Mutant("padded-decode-position", "a left-padded row's new token keeps the previous token's RoPE position",
           (Edit(GEN, "pad = Padding(keys, pad.positions[:, -1:] + 1)", "pad = Padding(keys, pad.positions[:, -1:])"),),
           (PROMPTS,),
           first=(SAMPLING,)),
)
