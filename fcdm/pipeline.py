"""`FCDMPipeline`: from a checkpoint, an exported folder or a hub repository to images in one call.

    pipe = FCDMPipeline.from_pretrained("results/000-FCDM-XL/checkpoints/0400000.pt")   # or a folder, or "user/repo"
    images = pipe(class_labels=[207, "otter"], seed=0).images                           # PIL images
    pipe(class_labels=[207], guidance_scale=4.0, num_inference_steps=20, scheduler="dpmsolver++")   # diffusers
    pipe(class_labels=[207], output_type="latent").images                               # (N, C, h, w) latents
    pipe.save_pretrained("out/")  /  pipe.push_to_hub("user/fcdm-xl")                  # safetensors + config.json

The defaults are the paper's sampling protocol: the in-house DDPM sampler with 250 steps, classifier-free guidance
1.5 on the first 3 channels, fp32 (TF32 matmuls on a GPU), the checkpoint's VAE and latent scale. A diffusers
scheduler (fcdm.schedulers) replaces the sampler when named. Class labels are numbers or ImageNet class names
(fcdm.labels). The VAE is loaded on first use, so loading and exporting never touch the network for it. Saving,
loading and uploading go through huggingface_hub's ModelHubMixin; a saved folder holds `model.safetensors` (the EMA
weights, fp32) and `config.json` (EXPORT_FORMAT: architecture, objective, image size, autoencoder, labels).
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from huggingface_hub import ModelHubMixin, snapshot_download
from PIL import Image
from safetensors.torch import load_file, save

from fcdm_kernels.dispatch import use_backend

from .cuda_graph import GraphedForward
from .files import atomic_write
from .labels import IMAGENET_ID2LABEL, class_ids
from .load import CheckpointError, build_fcdm, fit_state, load_fcdm, sampling_config
from .objectives import build_objective
from .sampling import generate, per_sample_generators
from .vae import VAE_ALIASES, decode, downsampling_factor, load_vae, resolve_vae_name, to_uint8

EXPORT_FORMAT = "fcdm-pipeline"
WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass
class FCDMPipelineOutput:
    images: object        # a list of PIL images, or a (N, C, h, w) float32 tensor for output_type="latent"
    class_labels: list    # the class number of each image


def _dtype(dtype) -> Optional[torch.dtype]:
    """None or fp32 -> None (no autocast); bf16 -> torch.bfloat16 autocast around the network."""
    if dtype is None or dtype in (torch.float32, "fp32", "float32"):
        return None
    if DTYPES.get(dtype, dtype) is torch.bfloat16:
        return torch.bfloat16
    raise ValueError(f"dtype must be fp32 or bf16 (or the torch dtypes), got {dtype!r}")


def load_decoder(vae_name: Optional[str], image_size: int, in_channels: int, device):
    """(VAE or None for pixel space, the shape (C, h, w) the model samples) for images of image_size pixels."""
    vae = load_vae(vae_name, device) if vae_name is not None else None
    factor = downsampling_factor(vae) if vae is not None else 1
    if image_size % (4 * factor):
        raise ValueError(f"image_size {image_size} must be divisible by {4 * factor} (VAE factor {factor} x FCDM's 4)")
    if vae is None and in_channels not in (1, 3):
        raise ValueError(f"pixel-space sampling (vae none) needs 1 or 3 image channels, got in_channels {in_channels}")
    return vae, (in_channels, image_size // factor, image_size // factor)


def to_images(vae, x: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """Samples -> images in [-1, 1] with 3 channels: decoded by the VAE, or (pixel space) grey expanded to RGB."""
    return decode(vae, x, scaling_factor) if vae is not None else x.clamp(-1, 1).expand(-1, 3, -1, -1)


def image_grid(images: list, columns: Optional[int] = None) -> Image.Image:
    """PIL images of one size -> one grid image, `columns` wide (default: all in one row up to 8)."""
    if not images:
        raise ValueError("image_grid: no images")
    columns = columns or min(len(images), 8)
    w, h = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


def save_image(image: Image.Image, path: str) -> None:
    """Write a PIL image atomically; the format comes from the extension."""
    fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise ValueError(f"cannot tell the image format of {path!r} from its extension (use .png or .jpg)")
    atomic_write(path, lambda f: image.save(f, format=fmt))


def _spec_from_checkpoint(loaded, image_size, objective, vae, vae_scaling_factor) -> dict:
    sampling = sampling_config(loaded.args, image_size=image_size, objective=objective, vae=vae,
                               vae_scaling_factor=vae_scaling_factor)
    arch = {k: (list(v) if isinstance(v, tuple) else v) for k, v in loaded.config.items()}
    arch["null_label"] = loaded.has_null_label
    num_classes = arch["num_classes"]
    return {"architecture": arch, "objective": sampling["objective"], "image_size": int(sampling["image_size"]),
            "autoencoder": {"name": resolve_vae_name(sampling["vae"]),
                            "scaling_factor": float(sampling["vae_scaling_factor"])},
            "id2label": {str(k): v for k, v in IMAGENET_ID2LABEL.items()} if num_classes == 1000 else None}


class FCDMPipeline(ModelHubMixin, library_name="fcdm", tags=["fcdm", "class-conditional", "image-generation"],
                   repo_url="https://github.com/star-kwon/FCDM"):
    """A loaded FCDM with everything needed to sample it: objective, VAE, latent scale, labels and runtime
    settings (device, dtype, backend, CUDA graphs)."""

    def __init__(self, model: torch.nn.Module, spec: dict, device=None, dtype=None, backend: Optional[str] = None,
                 cuda_graph: bool = False, tf32: bool = True):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.spec, self.autocast_dtype, self.backend, self.tf32 = spec, _dtype(dtype), backend, tf32
        self.network = GraphedForward(self.model) if cuda_graph else self.model
        self.objective = build_objective(spec["objective"], **(
            {"learn_sigma": self.model.learn_sigma} if spec["objective"] == "ddpm" else
            {"prediction": spec.get("prediction", "velocity")}))
        labels = spec.get("id2label")
        self.id2label = {int(k): v for k, v in labels.items()} if labels else None
        self._decoder = None
        self.loaded_from = None  # where the weights came from, for messages

    # ---- loading and saving ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "FCDMPipeline":
        """A checkpoint file (fcdm's, official, a state_dict or .safetensors), a saved folder or a hub repository.

        kwargs: device, dtype ("fp32" default, "bf16"), backend, cuda_graph, tf32; for a checkpoint file also
        from_checkpoint's overrides; for a hub repository also huggingface_hub's revision, cache_dir, token, ..."""
        if os.path.isfile(str(pretrained_model_name_or_path)):
            return cls.from_checkpoint(str(pretrained_model_name_or_path), **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_checkpoint(cls, path: str, image_size=None, objective=None, vae=None, vae_scaling_factor=None,
                        prefer_ema: bool = True, learn_sigma=None, architecture: Optional[dict] = None,
                        prediction: Optional[str] = None, **runtime) -> "FCDMPipeline":
        """A training checkpoint; each argument given overrides what the checkpoint's stored args say (vae: a hub
        name, a directory, 'ema'/'mse' or 'none' for pixel space; prediction: the flow objective's target).
        architecture: fcdm.load.model_config's arguments (model, hidden_size, depth, in_channels, num_classes)."""
        model, loaded = load_fcdm(path, prefer_ema, learn_sigma, **(architecture or {}))
        spec = _spec_from_checkpoint(loaded, image_size, objective, vae, vae_scaling_factor)
        if spec["objective"] == "flow":
            spec["prediction"] = prediction or loaded.args.get("prediction") or "velocity"
        pipe = cls(model, spec, **runtime)
        pipe.loaded_from = f"{path}: using {loaded.describe()}"
        return pipe

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision=None, cache_dir=None, force_download=False,
                         local_files_only=False, token=None, **runtime) -> "FCDMPipeline":
        folder = model_id if os.path.isdir(model_id) else snapshot_download(
            model_id, revision=revision, cache_dir=cache_dir, force_download=force_download, token=token,
            local_files_only=local_files_only, allow_patterns=[WEIGHTS_NAME, CONFIG_NAME, "*.md"])
        spec, state = read_exported(folder)
        model = build_fcdm(spec["architecture"], state, spec["architecture"]["learn_sigma"])
        fit_state(model, state, os.path.join(folder, WEIGHTS_NAME))
        pipe = cls(model, spec, **runtime)
        pipe.loaded_from = folder
        return pipe

    def _save_pretrained(self, save_directory: Path) -> None:
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.model.state_dict().items()}
        weights = save(state, metadata={"format": "pt"})
        atomic_write(str(save_directory / WEIGHTS_NAME), lambda f: f.write(weights))
        config = {"format": EXPORT_FORMAT, "format_version": 1, **self.spec}
        text = json.dumps(config, indent=2) + "\n"
        atomic_write(str(save_directory / CONFIG_NAME), lambda f: f.write(text), binary=False)  # written last

    # ---- sampling ----------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.spec["architecture"]["num_classes"]

    def decoder(self, need_vae: bool = True):
        """(VAE or None, sample shape (C, h, w)); the VAE is loaded on first use. Latents of the Stable Diffusion
        VAEs (8x downsampling) are sampled without loading (downloading) the VAE when need_vae is False."""
        name, size = self.spec["autoencoder"]["name"], self.spec["image_size"]
        if self._decoder is None and not need_vae and name in VAE_ALIASES.values() and size % 32 == 0:
            return None, (self.spec["architecture"]["in_channels"], size // 8, size // 8)
        if self._decoder is None:
            self._decoder = load_decoder(self.spec["autoencoder"]["name"], self.spec["image_size"],
                                         self.spec["architecture"]["in_channels"], self.device)
        return self._decoder

    def get_label_ids(self, labels) -> list[int]:
        """Class numbers for labels given as numbers or class names (as diffusers' DiTPipeline.get_label_ids)."""
        return class_ids(labels, self.num_classes, self.id2label or {})

    def _precision(self):
        """TF32 matmuls as asked (CUDA only), restored afterwards."""
        stack = contextlib.ExitStack()
        if self.device.type == "cuda":
            old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32
            stack.callback(lambda: (setattr(torch.backends.cuda.matmul, "allow_tf32", old[0]),
                                    setattr(torch.backends.cudnn, "allow_tf32", old[1])))
        if self.backend is not None:
            stack.enter_context(use_backend(self.backend))
        return stack

    @torch.no_grad()
    def __call__(self, class_labels, guidance_scale: float = 1.5, num_inference_steps: int = 250,
                 scheduler=None, sampler: Optional[str] = None, seed: Optional[int] = None, generator=None,
                 output_type: str = "pil", guide_all_channels: bool = False, guidance_interval=None,
                 progress: bool = True, return_dict: bool = True, **sampler_options):
        """Sample one image per class label. -> FCDMPipelineOutput(images, class_labels), or (images,) when
        return_dict is False.

        scheduler: a diffusers scheduler name of fcdm.schedulers.SCHEDULERS (or a configured one) instead of the
        in-house `sampler` (ddpm by default, or ddim; euler/heun/sde for flow). seed: image i draws from its own
        generator seeded seed + i (the images sample.py writes with --global-seed seed); generator: a
        torch.Generator or one per image instead; neither: the global RNG. sampler_options: the in-house samplers'
        (eta, respacing, ...; see fcdm.sampling.generate)."""
        if output_type not in ("pil", "latent", "pt", "np"):
            raise ValueError(f"output_type must be 'pil', 'latent', 'pt' or 'np', got {output_type!r}")
        y = self.get_label_ids(class_labels)
        if guidance_scale != 1 and not self.spec["architecture"]["null_label"]:
            raise ValueError("this model has no null label (trained without label dropout): use guidance_scale=1")
        if seed is not None and generator is not None:
            raise ValueError("pass seed or generator, not both")
        if seed is not None:
            generator = per_sample_generators([seed + i for i in range(len(y))], self.device)
        vae, shape = self.decoder(need_vae=output_type != "latent")
        with self._precision():
            x = generate(self.network, self.objective, torch.tensor(y, device=self.device), shape, sampler=sampler,
                         steps=num_inference_steps, cfg_scale=guidance_scale, guide_all_channels=guide_all_channels,
                         guidance_interval=guidance_interval, generator=generator, progress=progress,
                         autocast_dtype=self.autocast_dtype, scheduler=scheduler, **sampler_options)
        images = x if output_type == "latent" else to_images(vae, x, self.spec["autoencoder"]["scaling_factor"])
        if output_type == "pil":
            images = [Image.fromarray(a) for a in to_uint8(images).cpu().numpy()]
        elif output_type == "np":
            images = to_uint8(images).cpu().numpy()
        return FCDMPipelineOutput(images, y) if return_dict else (images,)


def read_exported(folder: str) -> tuple[dict, dict]:
    """(spec, state_dict) of a saved pipeline folder; CheckpointError naming what is missing or wrong."""
    config_path, weights_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise CheckpointError(f"{folder!r} is not an exported FCDM: {os.path.basename(path)} is missing "
                                  f"(write one with `python -m fcdm.export CKPT {folder}`)")
    with open(config_path, encoding="utf-8") as f:
        spec = json.load(f)
    if spec.pop("format", None) != EXPORT_FORMAT or spec.pop("format_version", None) != 1:
        raise CheckpointError(f"{config_path!r} is not an {EXPORT_FORMAT} config (version 1)")
    return spec, load_file(weights_path, device="cpu")


__all__ = ["FCDMPipeline", "FCDMPipelineOutput", "EXPORT_FORMAT", "image_grid", "load_decoder", "read_exported",
           "save_image", "to_images"]
