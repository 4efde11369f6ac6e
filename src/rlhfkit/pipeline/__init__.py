"""`rlhfkit pipeline`: the stages of the feedback loop run from one config (see run.py and stages.py)."""
