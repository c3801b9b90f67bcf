"""What a run directory holds and how a run survives: folders and locks, checkpoints, the run
record, resume, interrupts, sweeps.
"""
