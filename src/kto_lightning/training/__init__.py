"""Lightning around the core: the KTO and SFT modules, callbacks, optimizers and schedules,
multi-GPU strategies, torch.compile.
"""
