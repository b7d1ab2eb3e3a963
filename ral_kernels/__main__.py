"""``python -m ral_kernels``: the demo of :mod:`ral_kernels.tools.demo`."""

from .tools.demo import main

main()
