"""Small helpers every layer may use: secrets in configs and logs, whether the hub can be
reached, collectives that also run on one process, compiled code run eagerly.
"""
