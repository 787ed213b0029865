"""The shipped demo: a small class-conditional DiT that draws 28x28 digits, the classifier that
judges its samples, and the quality metrics (accuracy, Fréchet distance, PSNR/SSIM).

Load from ``smoothcache.demo.assets`` (``load_demo_pipeline``, ``load_quality_scorer``); how the
weights were trained is in docs/demo_training.md. This package imports diffusers and torchmetrics
(the ``demo`` extra), so the core library never imports it.
"""
