"""The trainer behind `train.py`: config, loop, state, checkpoints, distributed setup, logging, EMA and guards."""
