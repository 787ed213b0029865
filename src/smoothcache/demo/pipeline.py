"""DemoDiTPipeline: class-conditional DiT sampling in pixel space, shaped like diffusers' DiTPipeline.

The demo model draws 28x28 digits straight in pixel space, so there is no VAE; otherwise the call
is DiTPipeline's: the same arguments, one ``scheduler.set_timesteps`` per call, and one transformer
call per denoising step on the classifier-free-guidance batch (conditional half first, then the
null class). That shape is what lets smoothcache's hooks treat the demo like a real DiT.

Example:
    >>> pipe = DemoDiTPipeline.from_pretrained("src/smoothcache/demo/weights/demo-dit")
    >>> out = pipe([3, 7], num_inference_steps=20, generator=torch.manual_seed(0), output_type="pt")
    >>> out.images.shape
    torch.Size([2, 1, 28, 28])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, DiTTransformer2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

__all__ = ["DemoDiTPipeline"]


class DemoDiTPipeline(DiffusionPipeline):
    """Class-conditional pixel-space DiT with classifier-free guidance.

    Components:
        transformer: a ``DiTTransformer2DModel`` (ada_norm_zero); class ``num_embeds_ada_norm`` is
            the null ("no class") label used for guidance.
        scheduler: a ``DDIMScheduler`` with epsilon prediction.
    """

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: DiTTransformer2DModel, scheduler: DDIMScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @property
    def num_classes(self) -> int:
        """Real classes are 0..num_classes-1; ``num_classes`` itself is the null label."""
        return self.transformer.config.num_embeds_ada_norm

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | torch.Tensor,
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Draw one image per class label.

        Args:
            class_labels: digits to draw, each in ``0..num_classes-1``.
            guidance_scale: classifier-free guidance weight; guidance (and the doubled batch) is on
                when it is above 1.
            generator: seeds the initial noise, as in diffusers.
            num_inference_steps: denoising steps.
            output_type: ``"pil"`` (grayscale PIL images), ``"np"`` (B, H, W, 1) array in [0, 1]
                or ``"pt"`` (B, 1, H, W) float tensor in [0, 1].
            return_dict: return an ``ImagePipelineOutput`` rather than a one-element tuple.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f'output_type must be "pil", "np" or "pt", got {output_type!r}')
        device = self._execution_device
        labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(
                f"class_labels must be a non-empty list of digits in 0..{self.num_classes - 1}, "
                f"got {labels.tolist()}"
            )
        batch_size = labels.shape[0]
        config = self.transformer.config
        do_guidance = guidance_scale > 1

        sample = randn_tensor(
            (batch_size, config.in_channels, config.sample_size, config.sample_size),
            generator=generator, device=device, dtype=self.transformer.dtype,
        )
        null_labels = torch.full_like(labels, self.num_classes)
        class_labels_input = torch.cat([labels, null_labels]) if do_guidance else labels

        self.scheduler.set_timesteps(num_inference_steps)
        # The scheduler reads its timesteps on the host; the model gets a device copy made once. A
        # copy per step would make the host wait for the GPU every step, and a step that reuses,
        # being short, would lose much of its saving to that wait (README: Speed on the GPU).
        model_timesteps = self.scheduler.timesteps.to(device)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            latent_model_input = torch.cat([sample, sample]) if do_guidance else sample
            latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
            timesteps = model_timesteps[i].reshape(1).expand(latent_model_input.shape[0])
            noise_pred = self.transformer(
                latent_model_input, timestep=timesteps, class_labels=class_labels_input
            ).sample
            if do_guidance:
                cond, uncond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            sample = self.scheduler.step(noise_pred, t, sample).prev_sample

        images = (sample.float() / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
