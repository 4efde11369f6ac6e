"""rlhfkit: fine-tune models with feedback (SFT, reward models, DPO, PPO) for language models and control."""

import logging as _logging

__version__ = "0.1.0"

# transformers imports torchao (the int8 path of `rlhfkit compress`) whenever it is installed. On a CPU
# build torchao warns that its CUDA kernels do not load, and torch warns about its enum registrations:
# noise on every command, not something a user can act on.
_logging.getLogger("torchao").setLevel(_logging.ERROR)
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)
