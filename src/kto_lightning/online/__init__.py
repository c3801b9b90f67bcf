"""Online KTO's parts: reward functions that score completions, the labelling that turns rewards
into binary labels, and the sampler that draws completions from the policy as it is at a step.
"""
