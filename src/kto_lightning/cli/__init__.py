"""What the entry points share: config schemas and composition, checks of config values,
command-line messages, the end of a run, what evaluate scores.
"""
