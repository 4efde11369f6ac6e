"""`rlhfkit eval`: statistics (metrics), plots, learning curves, control-agent comparison and an HTML report.

The modules import nothing heavy at import time: metrics and curves need numpy only, plots imports
matplotlib when a plot is drawn, agents imports torch and gymnasium when agents are evaluated.
"""
