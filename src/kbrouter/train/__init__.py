"""Training the router (method.md sec. 5): step samples, trajectory synthesis, rewards, SFT and
Step-GRPO on TRL. Heavy dependencies (torch, transformers, trl, peft, datasets) are imported
inside functions, so importing this package stays fast.

- :mod:`kbrouter.train.steps` — :class:`StepSample`, paper/kbrouter JSONL readers and writers,
  deterministic stratified split;
- :mod:`kbrouter.train.synth` — teacher trajectories -> step samples, :class:`TeacherLabeler`;
- :mod:`kbrouter.train.rewards` — reward terms, :class:`StepRewarder`, TRL reward callables;
- :mod:`kbrouter.train.config` — :class:`StepGRPOConfig` (``paper_preset``), :class:`SFTConfig`;
- :mod:`kbrouter.train.sft`, :mod:`kbrouter.train.step_grpo` — the trainers (teacher-forced and
  on-policy), :mod:`kbrouter.train.onpolicy` — engine rollouts of the current checkpoint;
- :mod:`kbrouter.train.evaluate` — held-out step scoring;
- :mod:`kbrouter.train.modeling` — model loading (HF id/folder, GGUF, packaged preset), saving.
"""
