"""``python -m ral_kernels``: the demo of :mod:`ral_kernels.demo`."""

from .demo import main

main()
