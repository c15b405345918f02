"""Turn parsed flags into the objects the loop needs: the dataset, the VAE (optional), the model and its wrapper."""
from __future__ import annotations

import torch
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import fcdm
from fcdm.data import ImageFolderDataset, LatentStore, NpyFeatureDataset, ProceduralShapes
from fcdm.optim import build_optimizer
from fcdm.vae import SD_VAE_SCALE, latent_shape, load_vae


def build_dataset(args):
    """The training set for args.data_source; sets args.in_channels, args.input_size, args.num_classes and
    args.vae_scaling_factor (a latent store's recorded scale unless the flag gave one)."""
    if args.data_source == "procedural":
        dataset = ProceduralShapes(args.image_size, args.dataset_size, seed=args.global_seed)
        channels, size, classes = 3, args.image_size, dataset.num_classes
    elif args.data_source in ("imagefolder", "imagefolder_latent"):
        dataset = ImageFolderDataset(args.data_path, args.image_size, flip=args.random_flip)
        channels, size, classes = 3, args.image_size, dataset.num_classes   # latents: fixed up after the VAE loads
    elif args.data_source == "npy":
        dataset = NpyFeatureDataset(args.feature_path, args.label_path)
        channels, size, classes = dataset.channels, dataset.latent_size, args.num_classes or 1000
    else:
        dataset = LatentStore(args.latent_store, args.vae_scaling_factor, flip=args.random_flip)
        channels, size, classes = dataset.channels, dataset.latent_size, dataset.num_classes
        args.vae_scaling_factor = dataset.scaling_factor
    if args.in_channels is not None and args.in_channels != channels and args.data_source != "imagefolder_latent":
        raise ValueError(f"--in-channels {args.in_channels} does not match the data, which has {channels} channels")
    if args.num_classes is not None and args.num_classes < classes:
        raise ValueError(f"--num-classes {args.num_classes} is smaller than the data's {classes} classes")
    if args.vae_scaling_factor is None:
        args.vae_scaling_factor = SD_VAE_SCALE
    args.in_channels = args.in_channels or channels
    args.input_size = size
    args.num_classes = args.num_classes or classes
    return dataset


def build_vae(args, device):
    """The diffusers AutoencoderKL named by --vae, frozen, or None. With --data-path (images encoded on the fly) it
    sets args.in_channels and args.input_size to the latents'."""
    if not args.vae:
        return None
    try:
        vae = load_vae(args.vae, device)
    except (ValueError, ImportError) as err:  # no network, no cache, no diffusers: say what to do instead
        why = str(err).rstrip(".") if isinstance(err, ValueError) else f"cannot load the VAE {args.vae!r}: {err}"
        raise ValueError(f"--vae: {why}. Either pass a local copy, --vae <local "
                         f"dir> (a diffusers AutoencoderKL directory, e.g. saved once where there is network with "
                         f"AutoencoderKL.from_pretrained({args.vae!r}).save_pretrained(DIR)), or train in pixel "
                         f"space with --vae none") from err
    if args.data_source == "imagefolder_latent":
        args.in_channels, args.input_size, _ = latent_shape(vae, args.image_size)
    return vae


def build_model(args) -> torch.nn.Module:
    """An FCDM from --model, with --hidden-size / --depth overrides, sized for the data."""
    if args.input_size % 4:
        raise ValueError(f"the model input must be divisible by 4 (two downsamplings), got {args.input_size}px")
    model = fcdm.FCDM(in_channels=args.in_channels, hidden_size=args.hidden_size, depth=tuple(args.depth),
                      num_classes=args.num_classes, learn_sigma=args.learn_sigma,
                      class_dropout_prob=args.class_dropout_prob, label_dropout="external")
    if args.grad_checkpointing:
        model.set_grad_checkpointing()
    return model


def wrap_model(model, averages: list, args, world_size: int, device: torch.device) -> torch.nn.Module:
    """What the forward runs: DDP, FSDP2 (which shards `model` and its weight averages, the EMA copies, in place) or
    the model itself (a single process needs no wrapper), then optionally torch.compile."""
    if args.fsdp:
        for module in (model, *averages):
            for block in module.all_blocks():
                fully_shard(block)
            fully_shard(module)
        wrapped = model
    elif world_size > 1:
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        wrapped = model
    return torch.compile(wrapped) if args.compile else wrapped


def build_training_optimizer(model, args, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with --lr and --weight-decay, as fcdm.optim builds it for the benchmarks too (fused on CUDA)."""
    return build_optimizer(model.parameters(), args.lr, args.weight_decay, device)
