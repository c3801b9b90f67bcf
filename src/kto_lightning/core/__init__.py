"""The algorithm: the KTO loss, the typed training step, exact chunked log-probabilities, class
weights, metrics, packed-sequence positions. Pure torch: no Lightning, no files.
"""
