"""The trainer behind `train.py`. Its modules, in the order a run meets them:

- config.py: the flags, with the CPU demo's and the paper's defaults
- builders.py: the dataset, the VAE, the model and its DDP / FSDP2 wrapper, from the flags
- loop.py: set-up (one Run object), one training step, the periodic actions, and the loop itself
- state.py: the progress counters and RNG states, saved whole, and the per-step seeds
- resume.py: what a checkpoint holds, its files, and finding the run and checkpoint to resume
- ema.py, guards.py (the NaN guard, stopping on SIGTERM), evaluation.py, previews.py (sample grids), run_logger.py

Process groups (fcdm.distributed), the VAE (fcdm.vae) and sampling (fcdm.sampling) are library parts it shares.
"""
