"""fcdm: a fast, tested implementation of FCDM (Reviving ConvNeXt for Efficient Convolutional Diffusion Models).

    import fcdm
    model = fcdm.FCDM_models["FCDM-XL"]()          # official kwargs: in_channels, num_classes, learn_sigma, ...
    model.load_state_dict(official_state_dict)      # strict; official checkpoints load as they are
    with fcdm.use_backend("torch"): out = model(x, t, y)
    pipe = fcdm.FCDMPipeline.from_pretrained("ckpt.pt"); pipe(class_labels=[207, 360], seed=0).images   # PIL
"""
from fcdm_kernels.dispatch import BACKENDS, get_backend, set_backend, use_backend

from .models import FCDM, FCDM_CONFIGS, FCDM_models

__version__ = "0.1.0"


def __getattr__(name):
    # Imported on first use: the pipeline pulls in huggingface_hub, PIL and the samplers, which `import fcdm` need not.
    if name == "FCDMPipeline":
        from .pipeline import FCDMPipeline
        return FCDMPipeline
    raise AttributeError(f"module 'fcdm' has no attribute {name!r}")


__all__ = ["FCDMPipeline", "FCDM", "FCDM_models", "FCDM_CONFIGS", "set_backend", "get_backend", "use_backend",
           "BACKENDS"]
