"""rlhfkit: fine-tune models with feedback (SFT, reward models, DPO, PPO) for language models and control."""

__version__ = "0.1.0"
