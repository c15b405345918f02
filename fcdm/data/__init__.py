"""Training data: the built-in procedural dataset, ImageFolder, official .npy latents and the sharded latent store."""
from .imagefolder import ImageFolderDataset, center_crop_arr
from .latent_store import LatentStore
from .npy_features import NpyFeatureDataset
from .procedural import ProceduralShapes
from .sampler import GlobalBatchSampler

__all__ = ["ProceduralShapes", "ImageFolderDataset", "NpyFeatureDataset", "LatentStore", "GlobalBatchSampler",
           "center_crop_arr"]
