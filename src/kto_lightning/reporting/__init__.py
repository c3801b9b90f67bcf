"""What a run shows: the progress line, metrics.csv step numbers, W&B, the model card, sweep
reports.
"""
