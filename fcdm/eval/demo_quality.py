"""Does the demo model draw the classes it is asked for? A small CNN trained on the procedural shapes judges.

Two numbers, for samples generated under classifier-free guidance:
- class_accuracy: the fraction of samples the classifier assigns to the class they were conditioned on
  (chance is 10%; real images score ~100%).
- fd_classifier: the Frechet distance between the classifier's penultimate features of generated and of held-out
  real images, an FID in miniature (0 for identical distributions). fd_real is the same distance between two
  independent real sets: the floor the generated samples can reach at this sample size.

The classifier is trained deterministically (fixed seed, fixed data) in ~20 s on 2 CPU cores and cached on disk.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fcdm.data.procedural import NUM_CLASSES, ProceduralShapes
from fcdm.eval.metrics import feature_statistics
from fcdm.sampling import generate

CLASSIFIER_VERSION = 3
_HELD_OUT_SEED = 1_000_003  # real reference images come from a seed the generator never trained on


class ShapeClassifier(nn.Module):
    """Three conv stages (32 -> 16 -> 8 px) and global average pooling -> a 64-d feature -> 10 logits."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, 3, H, W) in [-1, 1] -> (features (N, 64), logits (N, 10))."""
        f = self.features(x)
        return f, self.head(f)


def _real_images(image_size: int, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ds = ProceduralShapes(image_size, count, seed)
    return torch.stack([ds.image(i) for i in range(count)]), torch.tensor([ds.label(i) for i in range(count)])


def default_cache_dir() -> str:
    return os.environ.get("FCDM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fcdm"))


def train_classifier(image_size: int = 32, steps: int = 500, seed: int = 0, cache_dir: str | None = None,
                     log=print) -> ShapeClassifier:
    """The cached classifier for this image size, or train one (deterministic: same seed, same weights)."""
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, f"shape_classifier_v{CLASSIFIER_VERSION}_{image_size}px_{steps}steps_s{seed}.pt")
    model = ShapeClassifier()
    if os.path.isfile(path):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    log(f"training the demo-quality classifier ({steps} steps, cached at {path})")
    with torch.random.fork_rng(devices=[]):  # restores the CPU generator afterwards; CUDA's are left untouched
        torch.random.default_generator.manual_seed(seed)
        model = ShapeClassifier()  # initialised under the seed too, so the weights are a function of the seed
        x, y = _real_images(image_size, 2000, seed=_HELD_OUT_SEED + 1 + seed)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(steps):
            idx = torch.randint(len(x), (64,))
            # Noise augmentation, so slightly imperfect samples are still judged by their shape and colour.
            xb = x[idx] + 0.15 * torch.rand(()) * torch.randn_like(x[idx])
            loss = F.cross_entropy(model(xb)[1], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D), via fcdm.eval's FID maths."""
    return feature_statistics(feats_a).frechet_distance(feature_statistics(feats_b))


class DemoQuality:
    """Callable evaluator: generate `num_samples` class-balanced CFG samples and score them."""

    metric = "fd_classifier"
    lower_is_better = True

    def __init__(self, image_size: int, objective, sampler: str, steps: int, cfg_scale: float,
                 num_samples: int = 500, batch_size: int = 250, seed: int = 0, classifier_steps: int = 500,
                 device="cpu", autocast_dtype=None, cache_dir: str | None = None, log=print):
        self.objective, self.sampler, self.steps, self.cfg_scale = objective, sampler, steps, cfg_scale
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.image_size, self.device, self.autocast_dtype = image_size, torch.device(device), autocast_dtype
        self.classifier = train_classifier(image_size, classifier_steps, cache_dir=cache_dir, log=log).to(device)
        real_a, labels_a = _real_images(image_size, num_samples, _HELD_OUT_SEED)
        real_b, _ = _real_images(image_size, num_samples, _HELD_OUT_SEED + 7)
        feats_a, logits_a = self.classify(real_a)
        self.real_features = feats_a
        self.real_accuracy = float((logits_a.argmax(1) == labels_a.numpy()).mean())
        self.fd_real = frechet_distance(feats_a, self.classify(real_b)[0])

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        feats, logits = zip(*(self.classifier(chunk.to(self.device).float())
                              for chunk in images.split(self.batch_size)))
        return torch.cat(feats).cpu().double().numpy(), torch.cat(logits).cpu().numpy()

    @torch.no_grad()
    def __call__(self, model) -> dict:
        labels = torch.arange(self.num_samples) % NUM_CLASSES
        gen = torch.Generator(self.device).manual_seed(self.seed + 12345)
        samples = [generate(model, self.objective, y.to(self.device), shape=(3, self.image_size, self.image_size),
                            sampler=self.sampler, steps=self.steps, cfg_scale=self.cfg_scale, generator=gen,
                            autocast_dtype=self.autocast_dtype).clamp(-1, 1).cpu()
                   for y in labels.split(self.batch_size)]
        feats, logits = self.classify(torch.cat(samples))
        return {"class_accuracy": float((logits.argmax(1) == labels.numpy()).mean()),
                "fd_classifier": frechet_distance(feats, self.real_features),
                "fd_real": self.fd_real, "real_accuracy": self.real_accuracy}
