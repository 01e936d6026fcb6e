"""The toy world: a tiny but genuine Stable Diffusion pipeline, its renderer and its detector.

Small enough to pretrain, generate with and align on two CPU cores, and built so that
each harmful category has a visual signature the detector (the toy Q16/NudeNet) can
measure. It is the embedded default of every stage and of the tests.
"""
