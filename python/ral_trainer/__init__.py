"""ral_trainer: the thin RAL trainer (model patching, old-policy capture, GRPO + RAL losses).

It depends on :mod:`ral_kernels`, never the other way round. The package is reserved here
so that the layout is fixed; its modules arrive with the trainer work.
"""

__all__: list[str] = []
